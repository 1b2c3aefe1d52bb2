{{/*
Names and labels.
*/}}
{{- define "edgeroute.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "edgeroute.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "edgeroute.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "edgeroute.selectorLabels" -}}
app.kubernetes.io/name: {{ include "edgeroute.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "edgeroute.labels" -}}
helm.sh/chart: {{ include "edgeroute.chart" . }}
{{ include "edgeroute.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: edgeroute
{{- end }}

{{/* The bundled Redis: its own name label, so no gateway selector ever matches it. */}}
{{- define "edgeroute.redisSelectorLabels" -}}
app.kubernetes.io/name: {{ include "edgeroute.name" . }}-redis
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "edgeroute.redisLabels" -}}
helm.sh/chart: {{ include "edgeroute.chart" . }}
{{ include "edgeroute.redisSelectorLabels" . }}
app.kubernetes.io/version: {{ .Values.redis.bundled.image.tag | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: edgeroute
{{- end }}

{{- define "edgeroute.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "edgeroute.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "edgeroute.image" -}}
{{- if not .Values.image.repository -}}
{{- fail "image.repository is not set: no edgeroute image is published to a registry. Build it from the repository root (docker build -t REGISTRY/edgeroute:TAG .), push it (docker push REGISTRY/edgeroute:TAG) and install with --set image.repository=REGISTRY/edgeroute --set image.tag=TAG; see the chart README" -}}
{{- end -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end }}

{{/*
The edgeroute config the pods run, as YAML: `configFile` (a whole edgeroute config file, e.g.
--set-file configFile=edgeroute.yaml) when given, else `config`. A file written for a laptop
listens on 127.0.0.1, which nothing outside the pod reaches: a loopback or missing
server.host becomes 0.0.0.0. Use it as `include "edgeroute.effectiveConfig" . | fromYaml`.
*/}}
{{- define "edgeroute.effectiveConfig" -}}
{{- if .Values.configFile -}}
{{- $file := fromYaml .Values.configFile -}}
{{- if hasKey $file "Error" -}}
{{- fail (printf "configFile is not a YAML mapping: %s" $file.Error) -}}
{{- end -}}
{{- $server := $file.server | default dict -}}
{{- if has (toString ($server.host | default "127.0.0.1")) (list "127.0.0.1" "localhost" "::1") -}}
{{- $_ := set $server "host" "0.0.0.0" -}}
{{- end -}}
{{- $_ := set $file "server" $server -}}
{{- toYaml $file -}}
{{- else -}}
{{- /* config.reload is the chart's setting, not edgeroute's (which refuses unknown keys) */ -}}
{{- toYaml (omit (.Values.config | default dict) "reload") -}}
{{- end -}}
{{- end }}

{{/*
The container port: the config's server.port is the one source of truth.
*/}}
{{- define "edgeroute.port" -}}
{{- $config := include "edgeroute.effectiveConfig" . | fromYaml -}}
{{- $server := $config.server | default dict -}}
{{- $server.port | default 8080 | int -}}
{{- end }}

{{/*
Whole seconds of edgeroute's drain window (config.server.shutdown_timeout_s, default 20).
*/}}
{{- define "edgeroute.shutdownTimeoutSeconds" -}}
{{- $config := include "edgeroute.effectiveConfig" . | fromYaml -}}
{{- $server := $config.server | default dict -}}
{{- if hasKey $server "shutdown_timeout_s" -}}
{{- $server.shutdown_timeout_s | ceil | int -}}
{{- else -}}
20
{{- end -}}
{{- end }}

{{/*
terminationGracePeriodSeconds: must outlast the preStop sleep plus the drain window, or the
kubelet kills the process while it is still finishing requests.
*/}}
{{- define "edgeroute.terminationGracePeriodSeconds" -}}
{{- $preStop := .Values.lifecycle.preStopSleepSeconds | int -}}
{{- $drain := include "edgeroute.shutdownTimeoutSeconds" . | int -}}
{{- $explicit := .Values.lifecycle.terminationGracePeriodSeconds -}}
{{- if kindIs "invalid" $explicit -}}
{{- add $preStop $drain (.Values.lifecycle.terminationGraceMarginSeconds | int) -}}
{{- else if le (int $explicit) (add $preStop $drain) -}}
{{- fail (printf "lifecycle.terminationGracePeriodSeconds (%d) must be longer than lifecycle.preStopSleepSeconds (%d) + config.server.shutdown_timeout_s (%d)" (int $explicit) $preStop $drain) -}}
{{- else -}}
{{- $explicit | int -}}
{{- end -}}
{{- end }}

{{/*
Secrets. The chart's Secret (named like the release) holds `secret.env` values unless
`secret.existingSecret` is set, and the Redis password when it is given inline or generated
for the bundled Redis.
*/}}
{{- define "edgeroute.secretName" -}}
{{- include "edgeroute.fullname" . -}}
{{- end }}

{{- define "edgeroute.envSecretName" -}}
{{- .Values.secret.existingSecret | default (include "edgeroute.secretName" .) -}}
{{- end }}

{{/* "true" when the chart's Secret carries the Redis password. */}}
{{- define "edgeroute.redisPasswordInChartSecret" -}}
{{- $r := .Values.redis -}}
{{- if $r.bundled.enabled -}}
{{- if $r.bundled.auth.enabled }}true{{ end -}}
{{- else if and $r.external.url (not $r.external.urlSecret.name) (not $r.external.existingSecret) $r.external.password -}}
true
{{- end -}}
{{- end }}

{{/* "true" when the gateway gets EDGEROUTE_REDIS_PASSWORD. */}}
{{- define "edgeroute.redisAuth" -}}
{{- $r := .Values.redis -}}
{{- if include "edgeroute.redisPasswordInChartSecret" . -}}
true
{{- else if and (not $r.bundled.enabled) $r.external.url (not $r.external.urlSecret.name) $r.external.existingSecret -}}
true
{{- end -}}
{{- end }}

{{- define "edgeroute.redisPasswordSecretName" -}}
{{- if include "edgeroute.redisPasswordInChartSecret" . -}}
{{- include "edgeroute.secretName" . -}}
{{- else -}}
{{- .Values.redis.external.existingSecret -}}
{{- end -}}
{{- end }}

{{- define "edgeroute.redisPasswordSecretKey" -}}
{{- if include "edgeroute.redisPasswordInChartSecret" . -}}
redis-password
{{- else -}}
{{- .Values.redis.external.existingSecretPasswordKey -}}
{{- end -}}
{{- end }}

{{/*
The bundled Redis password: the value given, else the one already in the release's Secret,
else a new random one (so upgrades keep it).
*/}}
{{- define "edgeroute.bundledRedisPassword" -}}
{{- if .Values.redis.bundled.auth.password -}}
{{- .Values.redis.bundled.auth.password -}}
{{- else -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "edgeroute.secretName" .) -}}
{{- if and $existing $existing.data (hasKey $existing.data "redis-password") -}}
{{- index $existing.data "redis-password" | b64dec -}}
{{- else -}}
{{- randAlphaNum 32 -}}
{{- end -}}
{{- end -}}
{{- end }}

{{- define "edgeroute.chartSecretNeeded" -}}
{{- if or (and (not .Values.secret.existingSecret) .Values.secret.env) (include "edgeroute.redisPasswordInChartSecret" .) -}}
true
{{- end -}}
{{- end }}

{{- define "edgeroute.redisTlsEnabled" -}}
{{- $tls := .Values.redis.external.tls -}}
{{- if and (not .Values.redis.bundled.enabled) (or $tls.caSecret $tls.caConfigMap) -}}
true
{{- end -}}
{{- end }}

{{- define "edgeroute.redisTlsDir" -}}
/etc/edgeroute-redis-tls
{{- end }}

{{/*
EDGEROUTE_REDIS_URL as an env value: the password is spliced in by the kubelet from
$(EDGEROUTE_REDIS_PASSWORD), so it never appears in a manifest. Empty when no Redis is set.
*/}}
{{- define "edgeroute.redisUrl" -}}
{{- $r := .Values.redis -}}
{{- if $r.bundled.enabled -}}
{{- $auth := ternary ":$(EDGEROUTE_REDIS_PASSWORD)@" "" (eq (include "edgeroute.redisAuth" .) "true") -}}
{{- printf "redis://%s%s-redis:6379/0" $auth (include "edgeroute.fullname" .) -}}
{{- else if and $r.external.url (not $r.external.urlSecret.name) -}}
{{- $url := $r.external.url -}}
{{- if or (contains "@" $url) (not (regexMatch "^rediss?(\\+cluster|\\+sentinel)?://[^/?#@]+" $url)) -}}
{{- fail (printf "redis.external.url %q: expected redis://, rediss://, redis+cluster://, redis+sentinel:// (or their rediss+ forms) followed by host:port and no credentials (use redis.external.username / password / existingSecret)" $url) -}}
{{- end -}}
{{- $parts := splitn "://" 2 $url -}}
{{- $scheme := $parts._0 -}}
{{- $userinfo := "" -}}
{{- if include "edgeroute.redisAuth" . -}}
{{- $userinfo = printf "%s:$(EDGEROUTE_REDIS_PASSWORD)@" $r.external.username -}}
{{- else if $r.external.username -}}
{{- $userinfo = printf "%s@" $r.external.username -}}
{{- end -}}
{{- $url = printf "%s://%s%s" $scheme $userinfo $parts._1 -}}
{{- if $r.external.sentinelAuth -}}
{{- if not (and (hasSuffix "+sentinel" $scheme) (include "edgeroute.redisAuth" .)) -}}
{{- fail "redis.external.sentinelAuth needs a redis+sentinel:// (or rediss+sentinel://) URL and a Redis password" -}}
{{- end -}}
{{- $sep := ternary "&" "?" (contains "?" $url) -}}
{{- $url = printf "%s%ssentinel_password=$(EDGEROUTE_REDIS_PASSWORD)" $url $sep -}}
{{- end -}}
{{- if include "edgeroute.redisTlsEnabled" . -}}
{{- if not (hasPrefix "rediss" $scheme) -}}
{{- fail "redis.external.tls: a CA is set but redis.external.url is not rediss:// (or rediss+sentinel://)" -}}
{{- end -}}
{{- $sep := ternary "&" "?" (contains "?" $url) -}}
{{- $url = printf "%s%sssl_ca_certs=%s/%s" $url $sep (include "edgeroute.redisTlsDir" .) $r.external.tls.caKey -}}
{{- end -}}
{{- $url -}}
{{- end -}}
{{- end }}

{{/*
The rendered edgeroute config. Refuses a config that carries a secret given in values, or a
Redis URL (that travels as EDGEROUTE_REDIS_URL, built from redis.*).
*/}}
{{- define "edgeroute.configYaml" -}}
{{- $config := include "edgeroute.effectiveConfig" . | fromYaml -}}
{{- $source := ternary "configFile" "config" (not (empty .Values.configFile)) -}}
{{- $state := $config.state | default dict -}}
{{- if hasKey $state "redis_url" -}}
{{- fail (printf "%s: state.redis_url: do not set it here (a ConfigMap is no place for credentials); use redis.external.url or redis.bundled.enabled" $source) -}}
{{- end -}}
{{- if not $config.routes -}}
{{- fail "no routes: every request would get 404. Give config.providers and config.routes in values, or a whole edgeroute config file with --set-file configFile=edgeroute.yaml (e.g. examples/openai.yaml); see the chart README" -}}
{{- end -}}
{{- $text := toYaml $config -}}
{{- range $name, $value := .Values.secret.env -}}
{{- $value = toString $value -}}
{{- if and (ge (len $value) 6) (contains $value $text) -}}
{{- fail (printf "%s contains the value of secret.env.%s: write ${%s} in the config instead" $source $name $name) -}}
{{- end -}}
{{- end -}}
{{- $password := toString .Values.redis.external.password -}}
{{- if and (ge (len $password) 6) (contains $password $text) -}}
{{- fail (printf "%s contains the value of redis.external.password" $source) -}}
{{- end -}}
{{- $text -}}
{{- end }}


{{/* How config changes reach running pods: "restart" (default) or "signal" (reload in place). */}}
{{- define "edgeroute.configReload" -}}
{{- (.Values.config | default dict).reload | default "restart" -}}
{{- end -}}
