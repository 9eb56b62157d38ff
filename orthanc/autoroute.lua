-- autoroute.lua: forward the source series of every stable study to the dicom-node AI node.
--
-- Loaded through "LuaScripts" in orthanc.json; the design is explained in orthanc/README.md.
-- In short: when a study has been quiet for StableAge seconds, every series that is an
-- acquisition (not a SEG/SR/PR/KO/..., not made by dicom-node, not a Secondary Capture) and
-- that holds a different number of instances than was last delivered is C-STOREd to the node,
-- one synchronous store job per series. The series-level metadata "AiRouted" records how many
-- instances the node received, so results filed back into the study (which make it stable
-- again) and repeated stable events trigger nothing, while late instances re-send their series.
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

-- C-STORE one series to the node and wait for the job to finish.
-- Returns the number of instances delivered, or nil when the store job failed.
--
-- Synchronous on purpose: the outcome is known here, so the flag is written only after
-- the node has acknowledged every instance, and a failure is logged with its series.
-- The price is that the Lua event thread is busy while the series is sent (sends are
-- serialised; reception of new instances is not affected).
local function send_series(series_id)
  local body = DumpJson({ Resources = { series_id }, Asynchronous = false })
  local response = RestApiPost('/modalities/' .. TARGET_MODALITY .. '/store', body)
  if response == nil then
    return nil
  end
  local job = ParseJson(response)
  if (job['FailedInstancesCount'] or 0) ~= 0 then
    return nil
  end
  -- ParseJson gives Lua floats: 22.0 would be stored and logged as "22.0".
  return math.tointeger(job['InstancesCount'] or 0)
end

function OnStableStudy(studyId, tags, metadata)
  local study_uid = tags['StudyInstanceUID'] or '?'
  local study = 'study ' .. study_uid .. ' (' .. studyId .. ')'
  local series_list = get_json('/studies/' .. studyId .. '/series')
  if series_list == nil then
    log(study .. ': no longer stored, nothing to route')
    return
  end

  local sent, unchanged, skipped, failed = 0, 0, 0, 0
  for _, series in ipairs(series_list) do
    local series_id = series['ID']
    local series_uid = (series['MainDicomTags'] or {})['SeriesInstanceUID'] or '?'
    local label = 'series ' .. series_uid .. ' (' .. series_id .. ')'
    local count = #series['Instances']
    local reason = skip_reason(series)
    if reason ~= nil then
      skipped = skipped + 1
      log(label .. ': skipped, ' .. reason)
    else
      local previous = routed_count(series_id)
      if previous == count then
        unchanged = unchanged + 1
        log(label .. ': already routed with ' .. count .. ' instances')
      else
        local delivered = send_series(series_id)
        if delivered == nil then
          failed = failed + 1
          log('ERROR ' .. label .. ': store to modality ' .. TARGET_MODALITY
              .. ' FAILED (see the failed DicomModalityStore job in /jobs);'
              .. ' the series is sent again at the next stable event of the study')
        else
          sent = sent + 1
          RestApiPut('/series/' .. series_id .. '/metadata/' .. ROUTED_METADATA, tostring(delivered))
          log(label .. ': sent ' .. delivered .. ' instances to ' .. TARGET_MODALITY
              .. ' (previously ' .. tostring(previous or 0) .. ')')
        end
      end
    end
  end
  log(study .. ': ' .. sent .. ' series sent, ' .. unchanged .. ' unchanged, '
      .. skipped .. ' skipped, ' .. failed .. ' failed')
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
end
