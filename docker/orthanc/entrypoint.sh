#!/bin/sh
# Writes Orthanc's configuration from the environment, then runs Orthanc in the foreground.
set -eu

: "${ORTHANC_USERNAME:?set ORTHANC_USERNAME (HTTP basic auth user)}"
: "${ORTHANC_PASSWORD:?set ORTHANC_PASSWORD (HTTP basic auth password)}"
NAME="${ORTHANC_NAME:-casam-orthanc}"
AET="${ORTHANC_AET:-CASAM}"
for v in "$ORTHANC_USERNAME" "$ORTHANC_PASSWORD" "$NAME" "$AET"; do
    case "$v" in
        *'"'* | *'\'*) echo "casam-orthanc: quotes and backslashes are not allowed in ORTHANC_* values" >&2; exit 2 ;;
    esac
done

CONF="${TMPDIR:-/tmp}/orthanc.json"
umask 077
cat > "$CONF" <<JSON
{
  "Name": "$NAME",
  "StorageDirectory": "/var/lib/orthanc/db",
  "IndexDirectory": "/var/lib/orthanc/db",
  "Plugins": ["/usr/share/orthanc/plugins/"],
  "HttpServerEnabled": true,
  "HttpPort": 8042,
  "HttpDescribeErrors": true,
  "DicomServerEnabled": true,
  "DicomAet": "$AET",
  "DicomPort": 4242,
  "RemoteAccessAllowed": true,
  "AuthenticationEnabled": true,
  "RegisteredUsers": { "$ORTHANC_USERNAME": "$ORTHANC_PASSWORD" },
  "ExecuteLuaEnabled": false,
  "DicomWeb": {
    "Enable": true,
    "Root": "/dicom-web/",
    "EnableWado": true,
    "WadoRoot": "/wado",
    "StudiesMetadata": "Full",
    "SeriesMetadata": "Full"
  }
}
JSON
exec /usr/sbin/Orthanc "$CONF"
