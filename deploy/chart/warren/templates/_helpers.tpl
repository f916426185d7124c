{{/*
Shared pieces of Warren's chart. Object names are fixed ("warren-..."), not derived from the
release name: the mesh is a cluster-wide singleton, the controller's error messages and
deploy/rbac/controller.yaml name them, and ztunnel finds the CA through the Service
environment variables of Service warren-ca (WARREN_CA_SERVICE_HOST).
*/}}

{{- define "warren.labels" -}}
app.kubernetes.io/part-of: warren
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* An image reference: repository:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "warren.image" -}}
{{- $tag := .image.tag | default .root.Chart.AppVersion -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}

{{/* Metrics annotations for Prometheus' kubernetes_sd (and PodMonitor selection by label). */}}
{{- define "warren.metricsAnnotations" -}}
prometheus.io/scrape: "true"
prometheus.io/port: "15020"
prometheus.io/path: /stats/prometheus
{{- end -}}

{{/* The Secret holding the mesh root's certificate and key (mounted by the controller only). */}}
{{- define "warren.caSecretName" -}}
{{- if .Values.ca.existingSecret -}}{{ .Values.ca.existingSecret }}{{- else -}}warren-ca-root{{- end -}}
{{- end -}}

{{/* Stops the render with a message that says what to do when the root is missing. */}}
{{- define "warren.checkRoot" -}}
{{- if not .Values.ca.rootCert -}}
{{- fail "ca.rootCert is required: create the mesh root once (docs/install.md, \"The mesh root\") and pass --set-file ca.rootCert=root-cert.pem with --set-file ca.rootKey=root-key.pem (or ca.existingSecret)" -}}
{{- end -}}
{{- if and (not .Values.ca.rootKey) (not .Values.ca.existingSecret) -}}
{{- fail "the controller needs the root's key: pass --set-file ca.rootKey=root-key.pem, or ca.existingSecret naming a Secret with root-cert.pem and root-key.pem" -}}
{{- end -}}
{{- end -}}

{{/*
The proxy's credential for the CA and the config stream: its own pod's ServiceAccount token,
projected by the kubelet (default audience: the controller's TokenReview names none), valid an
hour and rotated in place well before that; the proxies re-read the file at every use. The
token is bound to the pod: the controller accepts it only while this very pod exists.
*/}}
{{- define "warren.tokenVolume" -}}
- name: token
  projected:
    defaultMode: 0440
    sources:
      - serviceAccountToken: {path: token, expirationSeconds: 3600}
{{- end -}}

{{/*
The CA's address for proxies outside the release namespace (waypoints): --ca-addr takes an
IP:port, not a DNS name, and Service environment variables exist only in the Service's own
namespace. ca.clusterIP, else the ClusterIP the Service already has (lookup, on upgrades).
*/}}
{{- define "warren.caClusterIP" -}}
{{- $ip := .Values.ca.clusterIP -}}
{{- if not $ip -}}
{{- $svc := lookup "v1" "Service" .Release.Namespace "warren-ca" -}}
{{- if $svc -}}{{- $ip = $svc.spec.clusterIP -}}{{- end -}}
{{- end -}}
{{- if not $ip -}}
{{- fail "waypoints need the CA's IP (their --ca-addr takes no DNS name): set ca.clusterIP to a free address of the cluster's Service range, or install first without waypoints and add them with helm upgrade (the Service's ClusterIP is then looked up)" -}}
{{- end -}}
{{- $ip -}}
{{- end -}}

{{/*
What every proxy gets (environment): the controller's port (.addr, IP:port) serves both the CA
(HTTP/1.1) and the config stream (HTTP/2); the root verifies it, and the pod's own
ServiceAccount token (warren.tokenVolume, mounted at /var/run/warren/token) authenticates to
both.
*/}}
{{- define "warren.caEnv" -}}
- name: WARREN_CA_ADDR
  value: {{ .addr | quote }}
- name: WARREN_CONTROLLER_ADDR
  value: {{ .addr | quote }}
- {name: WARREN_CA_ROOT, value: /etc/warren/root/root-cert.pem}
- {name: WARREN_CA_TOKEN_FILE, value: /var/run/warren/token/token}
- {name: WARREN_TRUST_DOMAIN, value: {{ .root.Values.trustDomain | quote }}}
- {name: WARREN_LOG_FORMAT, value: {{ .root.Values.logFormat | quote }}}
- {name: WARREN_LOG, value: {{ .root.Values.logLevel | quote }}}
{{- end -}}
