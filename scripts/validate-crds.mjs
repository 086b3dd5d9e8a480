// Validates manifests with the schema validators that the npm packages
// @kubernetes-models/istio and @kubernetes-models/gateway-api generate from
// the projects' published CRDs. Run by `scripts/validate-crds.py --registry`,
// which installs the pinned packages: node validate-crds.mjs NODE_MODULES DIR...
import { readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [modules, ...dirs] = process.argv.slice(2);
const { parseAllDocuments } = await import(pathToFileURL(join(modules, "yaml/dist/index.js")).href);

// apiVersion group -> npm package that holds its models.
const packages = {
  "networking.istio.io": "@kubernetes-models/istio",
  "extensions.istio.io": "@kubernetes-models/istio",
  "security.istio.io": "@kubernetes-models/istio",
  "telemetry.istio.io": "@kubernetes-models/istio",
  "gateway.networking.k8s.io": "@kubernetes-models/gateway-api",
};

let passed = 0;
let failed = 0;
let skipped = 0;
const results = [];
for (const dir of dirs) {
  for (const file of readdirSync(dir).filter((f) => f.endsWith(".yaml")).sort()) {
    const path = join(dir, file);
    parseAllDocuments(readFileSync(path, "utf8")).forEach((parsed, index) => {
      const doc = parsed.toJS();
      if (!doc) return;
      const [group, version] = doc.apiVersion.includes("/") ? doc.apiVersion.split("/") : ["", doc.apiVersion];
      const name = `${path}#${index} ${doc.kind} ${doc.metadata?.name ?? ""}`;
      const pkg = packages[group];
      if (!pkg) {
        console.log(`skip  ${name} (${doc.apiVersion}: no npm package with its CRD)`);
        skipped += 1;
        return;
      }
      results.push(
        import(pathToFileURL(join(modules, pkg, group, version, `${doc.kind}.js`)).href)
          .then((module) => {
            new module[doc.kind](doc).validate();
            console.log(`ok    ${name}`);
            passed += 1;
          })
          .catch((error) => {
            console.log(`FAIL  ${name}: ${error.message}`);
            failed += 1;
          }),
      );
    });
  }
}
await Promise.all(results);
console.log(`npm schemas: ${passed} passed, ${failed} failed, ${skipped} skipped`);
process.exit(failed ? 1 : 0);
