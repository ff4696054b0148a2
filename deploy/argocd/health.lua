-- Argo CD health check for captioning.dev/VlmCaptioner (see docs/operator.md, "GitOps").
-- Reads only what the operator writes: status.observedGeneration and its conditions. The
-- kstatus pair decides first (Stalled=True is Degraded, Reconciling=True is Progressing), so
-- Argo CD and kstatus-based tools (Flux) agree; the Degraded, NvIngestWired and ChatReady
-- checks cover statuses written before those two existed. Lua 5.1 (gopher-lua), as Argo CD
-- runs it.
local hs = { status = "Progressing", message = "Waiting for the operator to report status" }
if obj.status == nil or obj.status.conditions == nil then
  return hs
end

local generation = obj.metadata.generation or 0
local observed = obj.status.observedGeneration
if observed == nil or observed < generation then
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end

local c = {}
for _, cond in ipairs(obj.status.conditions) do
  c[cond.type] = cond
end
local function say(cond)
  if cond.message ~= nil and cond.message ~= "" then
    return cond.reason .. ": " .. cond.message
  end
  return cond.reason
end

if c.Stalled ~= nil and c.Stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = say(c.Stalled)
  return hs
end
if c.Degraded ~= nil and c.Degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = say(c.Degraded)
  return hs
end
if c.NvIngestWired ~= nil and c.NvIngestWired.status == "False" then
  hs.status = "Degraded"
  hs.message = say(c.NvIngestWired)
  return hs
end
if c.ChatReady ~= nil and (c.ChatReady.reason == "ChatProbeFailed" or c.ChatReady.reason == "ChatProbeTimedOut") then
  hs.status = "Degraded"
  hs.message = say(c.ChatReady)
  return hs
end
-- Scaled to zero on purpose; a problem (above) still shows, since scaling up would hit it.
if c.Ready ~= nil and c.Ready.reason == "ScaledToZero" then
  hs.status = "Suspended"
  hs.message = say(c.Ready)
  return hs
end
if c.Ready ~= nil and c.Ready.status == "True" then
  hs.status = "Healthy"
  hs.message = say(c.Ready)
  return hs
end
if c.Reconciling ~= nil and c.Reconciling.status == "True" then
  hs.message = say(c.Reconciling)
  return hs
end
if c.Ready ~= nil then
  hs.message = say(c.Ready)
end
return hs
