
-- Several requests of one customer, decided in order: KEYS holds 5 keys and ARGV 11 arguments per request.
-- Returns one answer per request; a request's error does not stop the ones after it.
local answers = {}
for index = 0, #ARGV / 11 - 1 do
  answers[index + 1] = admit(KEYS, index * 5, ARGV, index * 11)
end
return answers
