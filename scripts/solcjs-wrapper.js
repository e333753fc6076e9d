#!/usr/bin/env node
// Makes the npm `solc` package (the official compiler built to wasm) look like a native solc to py-solc-x:
//   --version        prints "Version: X.Y.Z+commit.HASH..." as native solc does;
//   --standard-json  reads the standard-JSON input on stdin and prints only the JSON output.
// solcjs's own CLI prints a ">>>" line before the JSON and has no --allow-paths, hence this wrapper. Every import
// must be inside the input's `sources` (compile_contracts.py puts them there), so file-system flags are ignored.
"use strict";
const solc = require("solc");

const args = process.argv.slice(2);
if (args.includes("--version")) {
  process.stdout.write(`solc, the solidity compiler commandline interface\nVersion: ${solc.version()}\n`);
} else if (args.includes("--standard-json")) {
  const chunks = [];
  process.stdin.on("data", (chunk) => chunks.push(chunk));
  process.stdin.on("end", () => {
    const input = Buffer.concat(chunks).toString("utf8");
    const missing = (path) => ({ error: `import not provided in standard-JSON sources: ${path}` });
    process.stdout.write(solc.compile(input, { import: missing }));
  });
} else {
  process.stderr.write(`unsupported arguments: ${args.join(" ")} (only --version and --standard-json)\n`);
  process.exit(2);
}
