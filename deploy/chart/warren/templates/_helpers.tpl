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
The node tokens file (`<node> <token>` per line, sorted), computed once per render and
memoised, since it may hold random tokens and is used by several templates (the Secret, its
copies for waypoint namespaces, the controller's checksum annotation). Sources, later ones
winning: tokens already in the cluster's Secret (kept across upgrades), a new random token for
each Node without one (generateNodeTokens; `lookup` finds nothing under `helm template`), and
ca.nodeTokens.
*/}}
{{- define "warren.nodeTokens" -}}
{{- if not (hasKey .Values.ca "__tokensFile") -}}
{{- $tokens := dict -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace "warren-node-tokens" -}}
{{- if and $existing (hasKey ($existing.data | default dict) "tokens") -}}
{{- range (index $existing.data "tokens" | b64dec | splitList "\n") -}}
{{- $fields := splitList " " (trim .) -}}
{{- if and (eq (len $fields) 2) (not (hasPrefix "#" (first $fields))) -}}
{{- $_ := set $tokens (first $fields) (last $fields) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if .Values.ca.generateNodeTokens -}}
{{- $nodes := lookup "v1" "Node" "" "" -}}
{{- range ($nodes.items | default list) -}}
{{- if not (hasKey $tokens .metadata.name) -}}
{{- $_ := set $tokens .metadata.name (randAlphaNum 48) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $node, $token := .Values.ca.nodeTokens -}}
{{- $_ := set $tokens $node $token -}}
{{- end -}}
{{- $lines := list "# <node> <token>: written by Helm (ca.nodeTokens, ca.generateNodeTokens)" -}}
{{- range $node := keys $tokens | sortAlpha -}}
{{- $lines = append $lines (printf "%s %s" $node (index $tokens $node)) -}}
{{- end -}}
{{- $_ := set .Values.ca "__tokensFile" (printf "%s\n" (join "\n" $lines)) -}}
{{- end -}}
{{- index .Values.ca "__tokensFile" -}}
{{- end -}}

{{/*
The init container that copies this node's token out of the tokens file: every ztunnel and
waypoint pod mounts the whole Secret (a DaemonSet cannot pick a key per node), and the proxy
container sees only its own node's token.
*/}}
{{- define "warren.nodeTokenInit" -}}
- name: node-token
  image: {{ include "warren.image" (dict "image" .Values.initImage "root" .) }}
  imagePullPolicy: {{ .Values.initImage.pullPolicy }}
  command:
    - sh
    - -c
    - |
      token=$(awk -v node="$NODE_NAME" '$1 == node { print $2 }' /etc/warren/tokens/tokens)
      if [ -z "$token" ]; then
        echo "no CA token for node $NODE_NAME in Secret warren-node-tokens: run 'helm upgrade --reuse-values' (it gives every node a token) or set ca.nodeTokens.$NODE_NAME" >&2
        exit 1
      fi
      printf %s "$token" > /var/run/warren/token/token
  env:
    - name: NODE_NAME
      valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
  securityContext:
    runAsUser: 65532
    runAsGroup: 65532
    runAsNonRoot: true
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    capabilities: {drop: [ALL]}
  volumeMounts:
    - {name: node-tokens, mountPath: /etc/warren/tokens, readOnly: true}
    - {name: node-token, mountPath: /var/run/warren/token}
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
(HTTP/1.1) and the config stream (HTTP/2); the root verifies it and the node's token
authenticates to both.
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
