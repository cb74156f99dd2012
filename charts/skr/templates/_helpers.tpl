{{/*
=====================================================================================================
Public named templates — for platform teams' own charts (see the chart README, "Use in your chart").
Each takes a dict with one key, "values": the skr values (this chart's values.yaml shape). When skr is
a dependency of your chart, that is `.Values.skr` (Helm has merged this chart's defaults into it):

  spec:
    runtimeClassName: {{ .Values.skr.runtimeClassName }}
    containers:
      - name: app
        ...
      {{- include "skr.sidecar" (dict "values" .Values.skr) | nindent 6 }}
    volumes:
      {{- include "skr.volumes" (dict "values" .Values.skr) | nindent 6 }}

  skr.sidecar        the skr container (a list item)
  skr.volumes        the volumes the sidecar mounts (list items, all named skr-*)
  skr.podLabels      pod labels skr needs (the workload-identity label), as map entries
  skr.podAnnotations pod annotations skr needs (the Kata agent policy), as map entries
=====================================================================================================
*/}}

{{/* allowedEndpoints as SKR_ALLOWED_ENDPOINTS: a list or one comma-separated string, entries trimmed,
empty ones dropped. Empty result: skr's built-in Azure domains. */}}
{{- define "skr.allowedEndpoints" -}}
{{- $given := .allowedEndpoints | default list -}}
{{- $items := kindIs "string" $given | ternary (splitList "," (toString $given)) $given -}}
{{- $kept := list -}}
{{- range $items }}{{ with trim (toString .) }}{{ $kept = append $kept . }}{{ end }}{{ end -}}
{{- join "," $kept -}}
{{- end }}

{{/* The sidecar image reference: repository@digest when a digest is set, else repository:tag. */}}
{{- define "skr.image" -}}
{{- $image := .image -}}
{{- if eq (toString $image.tag) "latest" -}}
{{- fail "image.tag \"latest\" is refused: a moving tag can change the code that handles your keys without a new Kata policy. Use the chart's appVersion or another version tag, or pin image.digest." -}}
{{- end -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository $image.tag -}}
{{- end -}}
{{- end }}

{{/*
An exec probe against skr's loopback listener. skr binds 127.0.0.1 (and refuses non-loopback peers),
while kubelet's httpGet probes connect to the pod IP — so the probe runs inside the container, with the
image's own Python and no proxy (HTTP(S)_PROXY must not capture a loopback call). Any non-2xx answer,
refused connection or timeout makes urlopen raise, and the non-zero exit fails the probe. The HTTP timeout
is one second shorter than the probe's, so a slow answer fails as a timeout, not as a killed probe.
*/}}
{{- define "skr.probeExec" -}}
exec:
  command:
    - python3
    - -c
    - {{ printf "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%d%s', timeout=%d).close()" (int .port) .path (max 1 (sub (int .timeout) 1)) | quote }}
{{- end }}

{{/*
The same for the gRPC-only sidecar (grpc.only: no HTTP API to probe): the standard gRPC health service on
127.0.0.1, with the image's grpcio and no proxy. "serving" (readiness) needs SERVING; otherwise any answer
means the process is alive (it says NOT_SERVING until its self-check has passed).
*/}}
{{- define "skr.grpcProbeExec" -}}
exec:
  command:
    - python3
    - -c
    - {{ printf "import grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; r = g.HealthStub(grpc.insecure_channel('127.0.0.1:%d', options=[('grpc.enable_http_proxy', 0)])).Check(h.HealthCheckRequest(), timeout=%d); raise SystemExit(0 if %s else 1)" (int .port) (max 1 (sub (int .timeout) 1)) (ternary "r.status == h.HealthCheckResponse.SERVING" "True" .serving) | quote }}
{{- end }}

{{- define "skr.sidecar" -}}
{{- $v := .values -}}
{{- $auditDir := "/var/log/skr" -}}
{{- $grpcOnly := and $v.grpc.enabled $v.grpc.only -}}
- name: skr
  image: {{ include "skr.image" (dict "image" $v.image) | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  # ENTRYPOINT is `skr serve`; these are its flags.
  args:
    - --port
    - {{ ternary $v.grpc.port $v.port $grpcOnly | int | quote }}
    {{- if $v.grpc.enabled }}
    - --server-type
    - {{ ternary "grpc" "both" $grpcOnly | quote }}
    {{- if not $grpcOnly }}
    - --grpc-port
    - {{ $v.grpc.port | int | quote }}
    {{- end }}
    {{- end }}
    - --evidence
    - {{ $v.evidence | quote }}
    {{- if $v.audit.enabled }}
    - --audit-log
    - {{ printf "%s/%s" $auditDir $v.audit.file | quote }}
    {{- if $v.audit.stdout }}
    - --audit-stdout
    {{- end }}
    {{- end }}
    {{- range $v.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  env:
    {{- if $v.audit.enabled }}
    # the audit file is named per pod (audit.file's $(POD_NAME)): a shared claim never has two writers
    - name: POD_NAME
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
    {{- end }}
    - name: LogLevel
      value: {{ $v.logLevel | quote }}
    - name: SKR_STATE_DIR
      value: /var/lib/skr
    {{- with $v.maa.endpoint }}
    - name: SKR_MAA_ENDPOINT
      value: {{ . | quote }}
    {{- end }}
    {{- with $v.keyVault.endpoint }}
    - name: SKR_AKV_ENDPOINT
      value: {{ . | quote }}
    {{- end }}
    {{- with include "skr.allowedEndpoints" $v }}
    - name: SKR_ALLOWED_ENDPOINTS
      value: {{ . | quote }}
    {{- end }}
    {{- if not $v.tokenReuse }}
    - name: SKR_TOKEN_REUSE
      value: "off"
    {{- end }}
    {{- with $v.sidecarArgs }}
    - name: SkrSideCarArgs
      value: {{ toJson . | b64enc | quote }}
    {{- end }}
    {{- if $v.uvmReferenceInfo.enabled }}
    - name: UVM_SECURITY_CONTEXT_DIR
      value: {{ $v.uvmReferenceInfo.securityContextDir | quote }}
    {{- end }}
    {{- if $v.caBundle.configMap }}
    - name: SKR_CA_BUNDLE
      value: {{ printf "/etc/skr/ca/%s" $v.caBundle.key | quote }}
    {{- end }}
    {{- if $v.clientToken.secretName }}
    - name: SKR_CLIENT_TOKEN_FILE
      value: {{ printf "/etc/skr/client-token/%s" $v.clientToken.key | quote }}
    {{- end }}
    {{- with $v.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  securityContext:
    runAsNonRoot: true
    runAsUser: {{ $v.securityContext.runAsUser | int64 }}
    runAsGroup: {{ $v.securityContext.runAsGroup | int64 }}
    readOnlyRootFilesystem: true
    allowPrivilegeEscalation: false
    privileged: false
    capabilities:
      drop:
        - ALL
    seccompProfile:
      type: RuntimeDefault
  resources:
    {{- toYaml $v.resources | nindent 4 }}
  {{- if $grpcOnly }}
  startupProbe:
    {{- include "skr.grpcProbeExec" (dict "port" $v.grpc.port "serving" false "timeout" $v.probes.startup.timeoutSeconds) | nindent 4 }}
    {{- toYaml $v.probes.startup | nindent 4 }}
  livenessProbe:
    {{- include "skr.grpcProbeExec" (dict "port" $v.grpc.port "serving" false "timeout" $v.probes.liveness.timeoutSeconds) | nindent 4 }}
    {{- toYaml $v.probes.liveness | nindent 4 }}
  readinessProbe:
    {{- include "skr.grpcProbeExec" (dict "port" $v.grpc.port "serving" true "timeout" $v.probes.readiness.timeoutSeconds) | nindent 4 }}
    {{- toYaml $v.probes.readiness | nindent 4 }}
  {{- else }}
  startupProbe:
    {{- include "skr.probeExec" (dict "port" $v.port "path" "/healthz" "timeout" $v.probes.startup.timeoutSeconds) | nindent 4 }}
    {{- toYaml $v.probes.startup | nindent 4 }}
  livenessProbe:
    {{- include "skr.probeExec" (dict "port" $v.port "path" "/healthz" "timeout" $v.probes.liveness.timeoutSeconds) | nindent 4 }}
    {{- toYaml $v.probes.liveness | nindent 4 }}
  readinessProbe:
    {{- include "skr.probeExec" (dict "port" $v.port "path" "/readyz" "timeout" $v.probes.readiness.timeoutSeconds) | nindent 4 }}
    {{- toYaml $v.probes.readiness | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: skr-state
      mountPath: /var/lib/skr
    {{- if $v.audit.enabled }}
    - name: skr-audit
      mountPath: {{ $auditDir }}
    {{- end }}
    {{- if $v.uvmReferenceInfo.enabled }}
    - name: skr-uvm-reference-info
      mountPath: {{ printf "%s/reference-info-base64" $v.uvmReferenceInfo.securityContextDir | quote }}
      readOnly: true
    {{- end }}
    {{- if $v.caBundle.configMap }}
    - name: skr-ca-bundle
      mountPath: /etc/skr/ca
      readOnly: true
    {{- end }}
    {{- if $v.clientToken.secretName }}
    - name: skr-client-token
      mountPath: /etc/skr/client-token
      readOnly: true
    {{- end }}
{{- end }}

{{- define "skr.volumes" -}}
{{- $v := .values -}}
- name: skr-state
  emptyDir:
    sizeLimit: {{ $v.state.sizeLimit | quote }}
{{- if $v.audit.enabled }}
- name: skr-audit
  {{- if eq $v.audit.volume.type "existingClaim" }}
  persistentVolumeClaim:
    claimName: {{ $v.audit.volume.claimName | quote }}
  {{- else }}
  emptyDir:
    sizeLimit: {{ $v.audit.volume.sizeLimit | quote }}
  {{- end }}
{{- end }}
{{- if $v.uvmReferenceInfo.enabled }}
- name: skr-uvm-reference-info
  hostPath:
    path: {{ $v.uvmReferenceInfo.hostPath | quote }}
    type: File
{{- end }}
{{- if $v.caBundle.configMap }}
- name: skr-ca-bundle
  configMap:
    name: {{ $v.caBundle.configMap | quote }}
    items:
      - key: {{ $v.caBundle.key | quote }}
        path: {{ $v.caBundle.key | quote }}
{{- end }}
{{- if $v.clientToken.secretName }}
- name: skr-client-token
  secret:
    secretName: {{ $v.clientToken.secretName | quote }}
    defaultMode: 0444
    items:
      - key: {{ $v.clientToken.key | quote }}
        path: {{ $v.clientToken.key | quote }}
{{- end }}
{{- end }}

{{- define "skr.podLabels" -}}
{{- if .values.workloadIdentity.enabled -}}
azure.workload.identity/use: "true"
{{- end }}
{{- end }}

{{- define "skr.podAnnotations" -}}
{{- with .values.kataPolicy -}}
io.katacontainers.config.agent.policy: {{ . | quote }}
{{- end }}
{{- end }}

{{/*
=====================================================================================================
Internal helpers for this chart's own objects (the example deployment).
=====================================================================================================
*/}}
{{- define "skr.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "skr.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "skr.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "skr.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "skr.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "skr.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}
