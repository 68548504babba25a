
-- One request: KEYS and ARGV as described above.
return admit(KEYS, 0, ARGV, 0)
