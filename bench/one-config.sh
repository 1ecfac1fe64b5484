# Sourced by the benchmark scripts: writes to $1 the config they all change, one 1 KiB
# extension config whose header value starts "v0-" (changed to "v1-" and back).
write_one_config() {
  local filler
  filler=$(printf 'x%.0s' $(seq 1000))
  cat > "$1" <<YAML
version: 1
extension_configs:
  - name: add-header
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
      mutations: { response_mutations: [ { append: { header: { key: x-plugin, value: "v0-$filler" } } } ] }
YAML
}
