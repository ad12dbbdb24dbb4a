#!/usr/bin/env bash
# System packages diffrl uses: tesseract-ocr (the OCR reward), prometheus (with promtool: the
# monitoring tests run a real Prometheus and check deploy/prometheus). Installed when running as root,
# otherwise we say what to install and carry on (tests that need them are skipped with a reason).
set -u
missing=()
command -v tesseract >/dev/null 2>&1 || missing+=(tesseract-ocr)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing system packages: ${missing[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}") >/dev/null \
        || echo "WARNING: apt-get install ${missing[*]} failed" >&2
else
    echo "NOTE: please install: ${missing[*]} (e.g. sudo apt-get install ${missing[*]})" >&2
fi
exit 0
