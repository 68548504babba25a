
-- Several requests of one customer, decided in order: KEYS holds 6 keys and ARGV 12 arguments per request.
-- Returns one answer per request; a request's error does not stop the ones after it.
local answers = {}
for index = 0, #ARGV / 12 - 1 do
  answers[index + 1] = admit(KEYS, index * 6, ARGV, index * 12)
end
return answers
