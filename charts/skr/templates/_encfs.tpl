{{/*
=====================================================================================================
skr encfs — encrypted filesystems from Azure blobs for apps that only read files (see the README).

  skr.encfs          the skr encfs container (a list item): privileged (FUSE, loop devices, mount),
                     EncfsSideCarArgs from a Secret, /healthz /readyz probes, the mount directory shared
                     with mountPropagation Bidirectional
  skr.encfsVolumes   its volumes (list items, named skr-encfs-*): the shared mount directory (emptyDir)
  skr.encfsAppMount  the volumeMount for the app (HostToContainer: it sees mounts the sidecar makes)

Each takes (dict "values" <skr values>). The app reads <encfs.mountDir>/<name> once /readyz is true.
=====================================================================================================
*/}}

{{- define "skr.encfsImage" -}}
{{- $v := .values -}}
{{- if $v.encfs.image.repository -}}
{{- include "skr.image" (dict "image" $v.encfs.image) -}}
{{- else -}}
{{- printf "%s:%s-encfs" $v.image.repository $v.image.tag -}}
{{- end -}}
{{- end }}

{{- define "skr.encfs" -}}
{{- $v := .values -}}
{{- $e := $v.encfs -}}
- name: skr-encfs
  image: {{ include "skr.encfsImage" . | quote }}
  imagePullPolicy: {{ $e.image.pullPolicy }}
  args:
    - encfs
    - --backend
    - {{ $e.backend | quote }}
    - --cache-blocks
    - {{ $e.cacheBlocks | int | quote }}
    - --block-size
    - {{ $e.blockSizeKiB | int | quote }}
    - --port
    - {{ $e.healthPort | int | quote }}
    - --evidence
    - {{ $v.evidence | quote }}
  env:
    - name: EncfsSideCarArgs
      valueFrom:
        secretKeyRef:
          name: {{ required "encfs.argsSecret.name is required" $e.argsSecret.name | quote }}
          key: {{ $e.argsSecret.key | quote }}
    - name: LogLevel
      value: {{ $v.logLevel | quote }}
  # FUSE (/dev/fuse), loop devices, mount and dm-crypt need CAP_SYS_ADMIN and the devices: the Go encfs
  # sidecar runs privileged too. Only this container is privileged; the app stays confined.
  securityContext:
    privileged: true
    runAsUser: 0
    runAsNonRoot: false
  readinessProbe:
    {{- include "skr.probeExec" (dict "port" $e.healthPort "path" "/readyz" "timeout" 2) | nindent 4 }}
    periodSeconds: 2
    timeoutSeconds: 2
  livenessProbe:
    {{- include "skr.probeExec" (dict "port" $e.healthPort "path" "/healthz" "timeout" 2) | nindent 4 }}
    periodSeconds: 10
    timeoutSeconds: 2
  resources:
    {{- toYaml $e.resources | nindent 4 }}
  volumeMounts:
    - name: skr-encfs-mounts
      mountPath: {{ $e.mountDir | quote }}
      mountPropagation: Bidirectional
{{- end }}

{{- define "skr.encfsVolumes" -}}
- name: skr-encfs-mounts
  emptyDir: {}
{{- end }}

{{- define "skr.encfsAppMount" -}}
- name: skr-encfs-mounts
  mountPath: {{ .values.encfs.mountDir | quote }}
  mountPropagation: HostToContainer
  readOnly: true
{{- end }}
