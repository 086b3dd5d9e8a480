# OCI image of the filter for Istio's WasmPlugin (url: oci://…), following
# Istio's Wasm image convention: an image FROM scratch whose only file is
# ./plugin.wasm. Build after `make dist`:
#   docker build -t registry.example.com/aoai-msi-filter:0.1.0 . && docker push …
FROM scratch
COPY dist/plugin.wasm ./plugin.wasm
