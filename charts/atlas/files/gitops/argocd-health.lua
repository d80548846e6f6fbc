-- Argo CD health check for Atlas's kinds (AtlasKey, AtlasQuota, AtlasPriceList): register this one
-- script under each kind's key in argocd-cm (docs/gitops.md shows how). Argo CD runs it with only
-- the base and table libraries, so it uses no string functions.
--   Progressing  the operator has not yet processed this generation of the object
--   Degraded     a configuration error (condition Stalled=True): it will not fix itself
--   Suspended    an AtlasKey suspended or expired on purpose: it refuses traffic as declared
--   Healthy      in effect as declared (the message says when a budget is spent, at risk or past
--                its soft limit, or its usage cannot be shown for now)
local function condition(conditions, wanted)
  for _, c in ipairs(conditions or {}) do
    if c.type == wanted then
      return c
    end
  end
  return nil
end

local function describe(c)
  if c.message ~= nil and c.message ~= "" then
    return c.reason .. ": " .. c.message
  end
  return c.reason
end

local status = obj.status or {}
local generation = obj.metadata.generation or 0
if status.observedGeneration == nil or status.observedGeneration < generation then
  return {status = "Progressing", message = "waiting for the Atlas operator to process generation " .. generation}
end

local stalled = condition(status.conditions, "Stalled")
if stalled ~= nil and stalled.status == "True" then
  return {status = "Degraded", message = describe(stalled)}
end

local ready = condition(status.conditions, "Ready")
if ready == nil or ready.status ~= "True" then
  return {status = "Progressing", message = ready ~= nil and describe(ready) or "waiting for the Ready condition"}
end

local serving = condition(status.conditions, "Serving")
if serving ~= nil and serving.status == "False" then
  return {status = "Suspended", message = describe(serving)}
end

local message = describe(ready)
for _, notice in ipairs({"QuotaExhausted", "Demoted", "BudgetAtRisk", "UsageStale"}) do
  local c = condition(status.conditions, notice)
  if c ~= nil and c.status == "True" then
    message = message .. "; " .. describe(c)
  end
end
return {status = "Healthy", message = message}
