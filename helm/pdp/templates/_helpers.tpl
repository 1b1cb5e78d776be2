{{/* Names and labels. */}}
{{- define "pdp.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pdp.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "pdp.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "pdp.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pdp.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pdp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pdp.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "pdp.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Consistency checks the schema cannot express; each says what to set. */}}
{{- define "pdp.validate" -}}
{{- $v := .Values -}}
{{- if and (not $v.snapshot.url) (not $v.snapshot.inlineRules) -}}
{{- fail "pdp: set snapshot.url (file://, http(s):// or redis://) or snapshot.inlineRules" -}}
{{- end -}}
{{- if and $v.snapshot.url $v.snapshot.inlineRules -}}
{{- fail "pdp: set snapshot.url or snapshot.inlineRules, not both" -}}
{{- end -}}
{{- if $v.snapshot.signing.enabled -}}
{{- if and (not $v.snapshot.signing.existingSecret) (not $v.snapshot.signing.publicKeys) -}}
{{- fail "pdp: snapshot.signing.enabled needs snapshot.signing.existingSecret (with keyNames) or snapshot.signing.publicKeys" -}}
{{- end -}}
{{- if and $v.snapshot.signing.existingSecret (not $v.snapshot.signing.keyNames) -}}
{{- fail "pdp: snapshot.signing.existingSecret needs snapshot.signing.keyNames (the keys inside it to trust)" -}}
{{- end -}}
{{- end -}}
{{- if and (eq $v.geoip.source "existingClaim") (not $v.geoip.existingClaim) -}}
{{- fail "pdp: geoip.source=existingClaim needs geoip.existingClaim" -}}
{{- end -}}
{{- if and (eq $v.geoip.source "hostPath") (not $v.geoip.hostPath) -}}
{{- fail "pdp: geoip.source=hostPath needs geoip.hostPath" -}}
{{- end -}}
{{- if and (eq $v.geoip.source "geoipupdate") $v.geoip.sha256File -}}
{{- fail "pdp: geoip.sha256File cannot be used with geoip.source=geoipupdate (it writes no digest to pin); use existingClaim or hostPath" -}}
{{- end -}}
{{- if eq $v.geoip.source "geoipupdate" -}}
{{- if or (not $v.geoip.geoipupdate.accountId) (not $v.geoip.geoipupdate.licenseKeySecret.name) -}}
{{- fail "pdp: geoip.source=geoipupdate needs geoip.geoipupdate.accountId and geoip.geoipupdate.licenseKeySecret {name, key}" -}}
{{- end -}}
{{- end -}}
{{- if and $v.tls.requireClientCert (not $v.tls.existingSecret) -}}
{{- fail "pdp: tls.requireClientCert needs tls.existingSecret (with tls.crt, tls.key and ca.crt)" -}}
{{- end -}}
{{- if and $v.audit.log (not $v.audit.hmacKeySecret.name) -}}
{{- fail "pdp: audit.log needs audit.hmacKeySecret {name, key}: participant ids are pseudonymised with it" -}}
{{- end -}}
{{- if and $v.audit.log (ne $v.audit.log "stdout") (not $v.stateDir.enabled) -}}
{{- fail "pdp: an audit.log file needs stateDir.enabled (the root filesystem is read-only); or use audit.log=stdout" -}}
{{- end -}}
{{- $trusted := list -}}
{{- range $v.extAuthz.trustedHeaders -}}{{- $trusted = append $trusted (lower .) -}}{{- end -}}
{{- range $name := list "meetingId" "tags" "hostAccountId" "action" "userId" "accountId" -}}
{{- $source := index $v.extAuthz $name -}}
{{- if and (hasPrefix "header:" $source) (not (has (lower (trimPrefix "header:" $source)) $trusted)) -}}
{{- fail (printf "pdp: extAuthz.%s reads %s, which a client may write: list the header in extAuthz.trustedHeaders only if a proxy you run sets it on every request" $name $source) -}}
{{- end -}}
{{- end -}}
{{- if and $v.telemetry.serviceMonitor.enabled (ne $v.telemetry.metricsExporter "prometheus") -}}
{{- fail "pdp: telemetry.serviceMonitor.enabled needs telemetry.metricsExporter=prometheus" -}}
{{- end -}}
{{- if and $v.telemetry.serviceMonitor.enabled (ne $v.mode "daemonset") -}}
{{- fail "pdp: telemetry.serviceMonitor.enabled is for mode=daemonset (a sidecar's metrics belong to its pod's own monitor)" -}}
{{- end -}}
{{- if and (eq $v.telemetry.metricsExporter "otlp") (not $v.telemetry.otlpEndpoint) -}}
{{- fail "pdp: telemetry.metricsExporter=otlp needs telemetry.otlpEndpoint" -}}
{{- end -}}
{{- if and (eq $v.telemetry.tracesExporter "otlp") (not $v.telemetry.otlpEndpoint) -}}
{{- fail "pdp: telemetry.tracesExporter=otlp needs telemetry.otlpEndpoint" -}}
{{- end -}}
{{- end -}}

{{- define "pdp.snapshotUrl" -}}
{{- if .Values.snapshot.inlineRules -}}file:///etc/pdp/rules/rules.yaml{{- else -}}{{ .Values.snapshot.url }}{{- end -}}
{{- end -}}

{{- define "pdp.listenAddress" -}}
{{- if eq .Values.mode "daemonset" -}}$(POD_IP):{{ .Values.listen.port }}{{- else -}}unix:{{ .Values.listen.socketDir }}/{{ .Values.listen.socketName }}{{- end -}}
{{- end -}}

{{- define "pdp.pubkeyFiles" -}}
{{- $names := .Values.snapshot.signing.keyNames -}}
{{- if not .Values.snapshot.signing.existingSecret -}}{{- $names = keys .Values.snapshot.signing.publicKeys | sortAlpha -}}{{- end -}}
{{- $files := list -}}
{{- range $names -}}{{- $files = append $files (printf "/etc/pdp/keys/%s" .) -}}{{- end -}}
{{- join "," $files -}}
{{- end -}}

{{/*
The pdp container, for any pod spec. A meeting-node chart that depends on this
chart writes, inside its pod's `containers:` list:
  {{- include "pdp.sidecarContainer" (dict "Values" .Values.pdp "Release" .Release "Chart" (.Subcharts.pdp).Chart) | nindent 8 }}
*/}}
{{- define "pdp.sidecarContainer" -}}
{{- include "pdp.validate" . -}}
- name: pdp
  image: "{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}"
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args:
    - serve
    - --listen
    - {{ include "pdp.listenAddress" . | quote }}
    - --health-listen
    - "$(POD_IP):{{ .Values.healthPort }}"
  envFrom:
    - configMapRef:
        name: {{ include "pdp.fullname" . }}-config
  env:
    - name: POD_IP
      valueFrom:
        fieldRef:
          fieldPath: status.podIP
    {{- if .Values.snapshot.bearerTokenSecret.name }}
    - name: PDP_HTTP_BEARER_TOKEN_FILE
      value: /etc/pdp/store-token/{{ .Values.snapshot.bearerTokenSecret.key }}
    {{- end }}
    {{- if .Values.audit.hmacKeySecret.name }}
    - name: PDP_AUDIT_HMAC_KEY_FILE
      value: /etc/pdp/audit/{{ .Values.audit.hmacKeySecret.key }}
    {{- end }}
    {{- with .Values.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    {{- if eq .Values.mode "daemonset" }}
    - name: grpc
      containerPort: {{ .Values.listen.port }}
      protocol: TCP
    {{- end }}
    - name: health
      containerPort: {{ .Values.healthPort }}
      protocol: TCP
    {{- if eq .Values.telemetry.metricsExporter "prometheus" }}
    - name: metrics
      containerPort: {{ .Values.telemetry.prometheusPort }}
      protocol: TCP
    {{- end }}
  startupProbe:
    grpc:
      port: {{ .Values.healthPort }}
    periodSeconds: {{ .Values.probes.startup.periodSeconds }}
    failureThreshold: {{ .Values.probes.startup.failureThreshold }}
  readinessProbe:
    grpc:
      port: {{ .Values.healthPort }}
      service: pdp.v1.AdmissionService
    periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
    failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
  livenessProbe:
    grpc:
      port: {{ .Values.healthPort }}
    periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
    failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    {{- if ne .Values.mode "daemonset" }}
    - name: pdp-socket
      mountPath: {{ .Values.listen.socketDir }}
    {{- end }}
    - name: pdp-geoip
      mountPath: /var/lib/pdp/geoip
      readOnly: true
    {{- if .Values.stateDir.enabled }}
    - name: pdp-state
      mountPath: /var/lib/pdp/state
    {{- end }}
    {{- if .Values.snapshot.inlineRules }}
    - name: pdp-rules
      mountPath: /etc/pdp/rules
      readOnly: true
    {{- end }}
    {{- if .Values.snapshot.signing.enabled }}
    - name: pdp-keys
      mountPath: /etc/pdp/keys
      readOnly: true
    {{- end }}
    {{- if .Values.snapshot.bearerTokenSecret.name }}
    - name: pdp-store-token
      mountPath: /etc/pdp/store-token
      readOnly: true
    {{- end }}
    {{- if .Values.audit.hmacKeySecret.name }}
    - name: pdp-audit-key
      mountPath: /etc/pdp/audit
      readOnly: true
    {{- end }}
    {{- if and (eq .Values.mode "daemonset") .Values.tls.existingSecret }}
    - name: pdp-tls
      mountPath: /etc/pdp/tls
      readOnly: true
    {{- end }}
{{- if eq .Values.geoip.source "geoipupdate" }}
{{ include "pdp.geoipupdateContainer" (dict "root" . "once" false) }}
{{- end }}
{{- end -}}

{{/* geoipupdate: once as an init container (so the file exists before pdp starts), then as a sidecar. */}}
{{- define "pdp.geoipupdateContainer" -}}
{{- $v := .root.Values.geoip.geoipupdate -}}
- name: {{ if .once }}geoipupdate-init{{ else }}geoipupdate{{ end }}
  image: {{ $v.image }}
  env:
    - name: GEOIPUPDATE_ACCOUNT_ID
      value: {{ $v.accountId | quote }}
    - name: GEOIPUPDATE_LICENSE_KEY_FILE
      value: /etc/geoipupdate/{{ $v.licenseKeySecret.key }}
    - name: GEOIPUPDATE_EDITION_IDS
      value: {{ join " " $v.editionIds | quote }}
    - name: GEOIPUPDATE_DB_DIR
      value: /var/lib/pdp/geoip
    {{- if not .once }}
    - name: GEOIPUPDATE_FREQUENCY
      value: {{ $v.frequencyHours | quote }}
    {{- end }}
  securityContext:
    {{- toYaml .root.Values.securityContext | nindent 4 }}
  resources:
    requests:
      cpu: 10m
      memory: 32Mi
    limits:
      memory: 128Mi
  volumeMounts:
    - name: pdp-geoip
      mountPath: /var/lib/pdp/geoip
    - name: pdp-geoipupdate-key
      mountPath: /etc/geoipupdate
      readOnly: true
{{- end -}}

{{/* Init containers the pod needs (only geoipupdate's first download). */}}
{{- define "pdp.sidecarInitContainers" -}}
{{- if eq .Values.geoip.source "geoipupdate" -}}
{{ include "pdp.geoipupdateContainer" (dict "root" . "once" true) }}
{{- end -}}
{{- end -}}

{{/* The volumes pdp's container mounts, for the same pod spec's `volumes:` list. */}}
{{- define "pdp.sidecarVolumes" -}}
{{- if ne .Values.mode "daemonset" }}
- name: pdp-socket
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
{{- end }}
- name: pdp-geoip
{{- if eq .Values.geoip.source "existingClaim" }}
  persistentVolumeClaim:
    claimName: {{ .Values.geoip.existingClaim }}
    readOnly: true
{{- else if eq .Values.geoip.source "hostPath" }}
  hostPath:
    path: {{ .Values.geoip.hostPath }}
    type: Directory
{{- else }}
  emptyDir:
    sizeLimit: 512Mi
- name: pdp-geoipupdate-key
  secret:
    secretName: {{ .Values.geoip.geoipupdate.licenseKeySecret.name }}
{{- end }}
{{- if .Values.stateDir.enabled }}
- name: pdp-state
  emptyDir:
    sizeLimit: {{ .Values.stateDir.sizeLimit }}
{{- end }}
{{- if .Values.snapshot.inlineRules }}
- name: pdp-rules
  configMap:
    name: {{ include "pdp.fullname" . }}-rules
{{- end }}
{{- if .Values.snapshot.signing.enabled }}
- name: pdp-keys
  secret:
    secretName: {{ .Values.snapshot.signing.existingSecret | default (printf "%s-keys" (include "pdp.fullname" .)) }}
{{- end }}
{{- if .Values.snapshot.bearerTokenSecret.name }}
- name: pdp-store-token
  secret:
    secretName: {{ .Values.snapshot.bearerTokenSecret.name }}
{{- end }}
{{- if .Values.audit.hmacKeySecret.name }}
- name: pdp-audit-key
  secret:
    secretName: {{ .Values.audit.hmacKeySecret.name }}
{{- end }}
{{- if and (eq .Values.mode "daemonset") .Values.tls.existingSecret }}
- name: pdp-tls
  secret:
    secretName: {{ .Values.tls.existingSecret }}
{{- end }}
{{- end -}}

{{/* Pod-level settings shared by the daemonset and the example. */}}
{{- define "pdp.podSpecCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
terminationGracePeriodSeconds: {{ add (int .Values.graceSeconds) 10 }}
{{- end -}}
