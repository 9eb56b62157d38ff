-- autoroute.lua: forward the source series of every stable study to the dicom-node AI node.
--
-- Loaded through "LuaScripts" in orthanc.json; the design is explained in orthanc/README.md.
-- In short: when a study has been quiet for StableAge seconds, every series that is an
-- acquisition (not a SEG/SR/PR/KO/..., not made by dicom-node, not a Secondary Capture) and
-- that holds a different number of instances than was last delivered is C-STOREd to the node,
-- one store job per series, smallest series first, each job submitted when the previous one
-- ended (OnJobSuccess / OnJobFailure), so no callback waits for a transfer. The series-level
-- metadata "AiRouted" records how many instances the node received, so results filed back into
-- the study (which make it stable again) and repeated stable events trigger nothing, while late
-- instances re-send their series.
-- Log lines carry Orthanc IDs and DICOM UIDs only, never patient names or IDs.

-- Name of the node under "DicomModalities" in orthanc.json.
local TARGET_MODALITY = 'dicom-node'
-- Series-level metadata declared under "UserMetadata" in orthanc.json.
local ROUTED_METADATA = 'AiRouted'
-- Manufacturer (0008,0070) written into every result the node files back.
local NODE_MANUFACTURER = 'dicom-node'
-- Derived objects: results, annotations and selections, never inputs of an analysis.
local SKIPPED_MODALITIES = {
  SEG = true, SR = true, PR = true, KO = true, RTSTRUCT = true, REG = true, DOC = true,
}
-- Secondary Capture SOP classes (PS3.4 Annex B.5): screenshots and reports, never inputs.
local SECONDARY_CAPTURE_SOP_CLASSES = {
  ['1.2.840.10008.5.1.4.1.1.7'] = true,    -- Secondary Capture Image Storage
  ['1.2.840.10008.5.1.4.1.1.7.1'] = true,  -- Multi-frame Single Bit SC
  ['1.2.840.10008.5.1.4.1.1.7.2'] = true,  -- Multi-frame Grayscale Byte SC
  ['1.2.840.10008.5.1.4.1.1.7.3'] = true,  -- Multi-frame Grayscale Word SC
  ['1.2.840.10008.5.1.4.1.1.7.4'] = true,  -- Multi-frame True Color SC
}

local function log(message)
  -- Orthanc writes print() to its log as "Lua says: ..." at WARNING level.
  print('autoroute: ' .. message)
end

local function trim(text)
  return (string.gsub(text, '^%s*(.-)%s*$', '%1'))
end

-- GET a built-in REST resource as a table; nil if Orthanc answers with an error.
local function get_json(uri)
  local body = RestApiGet(uri)
  if body == nil then
    return nil
  end
  return ParseJson(body)
end

local function first_instance_sop_class(series)
  local instance_id = series['Instances'][1]
  if instance_id == nil then
    return nil
  end
  -- Orthanc keeps the SOP Class UID as instance metadata; reading it avoids opening the file.
  -- "?expand" answers with every metadata item and no error log when one is missing.
  local metadata = get_json('/instances/' .. instance_id .. '/metadata?expand')
  if metadata ~= nil and metadata['SopClassUid'] ~= nil then
    return metadata['SopClassUid']
  end
  local tags = get_json('/instances/' .. instance_id .. '/simplified-tags')
  if tags ~= nil then
    return tags['SOPClassUID']
  end
  return nil
end

-- Why a series is not sent to the node, or nil for a source series.
local function skip_reason(series)
  local tags = series['MainDicomTags'] or {}
  local modality = string.upper(trim(tags['Modality'] or ''))
  if SKIPPED_MODALITIES[modality] then
    return 'derived modality ' .. modality
  end
  if string.lower(trim(tags['Manufacturer'] or '')) == NODE_MANUFACTURER then
    return 'made by ' .. NODE_MANUFACTURER
  end
  local sop_class = first_instance_sop_class(series)
  if sop_class ~= nil and SECONDARY_CAPTURE_SOP_CLASSES[sop_class] then
    return 'secondary capture ' .. sop_class
  end
  return nil
end

-- Number of instances of the series the node has received, or nil if never sent.
local function routed_count(series_id)
  local metadata = get_json('/series/' .. series_id .. '/metadata?expand')
  if metadata == nil then
    return nil
  end
  return tonumber(metadata[ROUTED_METADATA])
end

-- Bytes Orthanc stores for a series (its index knows them: no file is read); 0 if unknown.
local function disk_size(series_id)
  local statistics = get_json('/series/' .. series_id .. '/statistics')
  if statistics == nil then
    return 0
  end
  return tonumber(statistics['DiskSize']) or 0
end

-- Sort the series to send, smallest first (ties by Orthanc ID, so the order is reproducible).
-- The series are sent one after the other over one link, so the whole study takes as long in
-- any order; smallest first makes each series complete, on average, as early as it can be
-- (shortest job first), and the node starts an analysis as soon as the series it needs is
-- complete. A small dedicated series (a crop, a single sequence) no longer waits behind the
-- large ones it does not need.
local function send_order(pending)
  for _, item in ipairs(pending) do
    item.size = disk_size(item.id)
  end
  table.sort(pending, function(a, b)
    if a.size ~= b.size then
      return a.size < b.size
    end
    return a.id < b.id
  end)
  return pending
end

-- Routings under way, by the ID of the store job now sending one of their series. Each entry
-- is { study = label, queue = series still to send, current = series being sent, sent = n,
-- unchanged = n, skipped = n, failed = n }. A routing lives in this Lua context only: if Orthanc
-- stops meanwhile, the series not yet flagged "AiRouted" are sent at the study's next stable event.
local routings = {}
-- Series whose store job failed, by job ID, so that a resubmitted job that succeeds flags them.
local failed_series = {}

-- Submit the store job of the next queued series of a routing, or log the routing's summary.
-- Asynchronous on purpose: while a Lua callback waits for a transfer, Orthanc holds REST
-- requests back (measured with Orthanc 1.10: a /tools/lookup took 1.46 s instead of 5 ms while
-- a study's four large series were sent), which stalled the node's queries, the viewer and
-- every other REST client for as long.
local function send_next(routing)
  while #routing.queue > 0 do
    local item = table.remove(routing.queue, 1)
    local body = DumpJson({ Resources = { item.id }, Asynchronous = true })
    local response = RestApiPost('/modalities/' .. TARGET_MODALITY .. '/store', body)
    local job = response and ParseJson(response)
    if job ~= nil and job['ID'] ~= nil then
      routing.current = item
      routings[job['ID']] = routing
      return
    end
    routing.failed = routing.failed + 1
    log('ERROR ' .. item.label .. ': store job to modality ' .. TARGET_MODALITY
        .. ' could not be submitted; the series is sent again at the next stable event of the study')
  end
  log(routing.study .. ': ' .. routing.sent .. ' series sent, ' .. routing.unchanged .. ' unchanged, '
      .. routing.skipped .. ' skipped, ' .. routing.failed .. ' failed')
end

-- Flag a series as routed with the number of instances the node acknowledged.
local function mark_routed(item, job)
  -- ParseJson gives Lua floats: 22.0 would be stored and logged as "22.0".
  local delivered = math.tointeger((job['Content'] or {})['InstancesCount'] or 0)
  RestApiPut('/series/' .. item.id .. '/metadata/' .. ROUTED_METADATA, tostring(delivered))
  log(item.label .. ': sent ' .. delivered .. ' instances (' .. item.size .. ' bytes) to '
      .. TARGET_MODALITY .. ' (previously ' .. tostring(item.previous or 0) .. ')')
end

function OnStableStudy(studyId, tags, metadata)
  local study_uid = tags['StudyInstanceUID'] or '?'
  local study = 'study ' .. study_uid .. ' (' .. studyId .. ')'
  local series_list = get_json('/studies/' .. studyId .. '/series')
  if series_list == nil then
    log(study .. ': no longer stored, nothing to route')
    return
  end

  local routing = { study = study, queue = {}, sent = 0, unchanged = 0, skipped = 0, failed = 0 }
  for _, series in ipairs(series_list) do
    local series_id = series['ID']
    local series_uid = (series['MainDicomTags'] or {})['SeriesInstanceUID'] or '?'
    local label = 'series ' .. series_uid .. ' (' .. series_id .. ')'
    local count = #series['Instances']
    local reason = skip_reason(series)
    if reason ~= nil then
      routing.skipped = routing.skipped + 1
      log(label .. ': skipped, ' .. reason)
    else
      local previous = routed_count(series_id)
      if previous == count then
        routing.unchanged = routing.unchanged + 1
        log(label .. ': already routed with ' .. count .. ' instances')
      else
        table.insert(routing.queue, { id = series_id, label = label, previous = previous })
      end
    end
  end
  send_order(routing.queue)
  send_next(routing)
end

function OnJobSuccess(jobId)
  local routing = routings[jobId]
  local retried = failed_series[jobId]
  if routing == nil and retried == nil then
    return
  end
  local job = get_json('/jobs/' .. jobId) or {}
  if routing ~= nil then
    routings[jobId] = nil
    mark_routed(routing.current, job)
    routing.sent = routing.sent + 1
    send_next(routing)
  else
    failed_series[jobId] = nil
    mark_routed(retried, job)
  end
end

function OnJobFailure(jobId)
  local job = get_json('/jobs/' .. jobId)
  if job == nil or job['Type'] ~= 'DicomModalityStore' then
    return
  end
  local content = job['Content'] or {}
  log(string.format('ERROR store job %s to AET %s failed: %s (%s); %s instances of %s;'
                    .. ' retry with POST /jobs/%s/resubmit',
                    jobId, tostring(content['RemoteAet']), tostring(job['ErrorDescription']),
                    tostring(job['ErrorDetails']), tostring(math.tointeger(content['InstancesCount'] or 0)),
                    table.concat(content['ParentResources'] or {}, ','), jobId))
  local routing = routings[jobId]
  if routing ~= nil then
    routings[jobId] = nil
    failed_series[jobId] = routing.current
    routing.failed = routing.failed + 1
    log('ERROR ' .. routing.current.label .. ': store to modality ' .. TARGET_MODALITY
        .. ' FAILED (see the failed DicomModalityStore job in /jobs);'
        .. ' the series is sent again at the next stable event of the study')
    send_next(routing)
  end
end
