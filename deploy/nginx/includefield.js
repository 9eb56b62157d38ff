// njs for deploy/nginx/ohif.conf: rewrite comma-separated includefield values as repeated
// parameters. The Orthanc DICOMweb plugin 1.7 ignores `includefield=a,b`, which OHIF sends
// (PS3.18 8.3.4.1 allows both forms). Same rule as split_includefield() in
// deploy/local/ohif_proxy.py; tests/deploy/test_compose.py runs both on the same cases.

function splitQuery(query) {
  if (!query) {
    return query;
  }
  var out = [];
  var parts = query.split('&');
  for (var i = 0; i < parts.length; i++) {
    var part = parts[i];
    var eq = part.indexOf('=');
    var key = eq < 0 ? part : part.substring(0, eq);
    if (eq >= 0 && decodeURIComponent(key.replace(/\+/g, ' ')) === 'includefield') {
      var fields = decodeURIComponent(part.substring(eq + 1).replace(/\+/g, ' ')).split(',');
      for (var j = 0; j < fields.length; j++) {
        var field = fields[j].trim();
        if (field) {
          out.push(key + '=' + encodeURIComponent(field));
        }
      }
    } else {
      out.push(part);
    }
  }
  return out.join('&');
}

// js_set $dicomweb_args: the request's query string with includefield split.
function args(r) {
  return splitQuery(r.variables.args || '');
}

export default { args, splitQuery };
