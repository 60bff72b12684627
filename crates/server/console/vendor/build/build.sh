#!/usr/bin/env bash
# Rebuilds ../codemirror.js from the locked packages (package-lock.json). Run by hand when the
# editor is upgraded; commit the result. Same lock, same esbuild: same bytes.
set -euo pipefail
cd "$(dirname "$0")"
npm ci --no-audit --no-fund --loglevel=error
{
  echo "/* CodeMirror 6 (codemirror 6.0.2, @codemirror/view 6.44.2, state 6.7.6, lang-python 6.2.1,"
  echo "   lang-javascript 6.2.5), MIT licence (vendor/LICENSE-codemirror), bundled by esbuild 0.28.2"
  echo "   from crates/server/console/vendor/build (bash build.sh). */"
  npx esbuild entry.mjs --bundle --format=esm --minify --legal-comments=none --target=es2020
} > ../codemirror.js
cp node_modules/codemirror/LICENSE ../LICENSE-codemirror
rm -rf node_modules
