#!/usr/bin/env bash
# On the device (no internet): unpack .whl/oracle.tar.xz (made by make_oracle_bundle.sh) into /tmp/oracle_site.
# Use:  source tests/device/install_oracle.sh   (exports PYTHONPATH)   or   eval "$(bash tests/device/install_oracle.sh)"
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
_site="${HM3_ORACLE_SITE:-/tmp/oracle_site}"
if [ ! -f "$_root/.whl/oracle.tar.xz" ]; then
    echo "install_oracle: no $_root/.whl/oracle.tar.xz (carry .whl; build it with make_oracle_bundle.sh)" >&2
else
    mkdir -p "$_site" && tar -xJf "$_root/.whl/oracle.tar.xz" -C "$_site" \
        && export HM3_ORACLE_SITE="$_site" PYTHONPATH="$_site${PYTHONPATH:+:$PYTHONPATH}" \
        && echo "export HM3_ORACLE_SITE=$_site PYTHONPATH=$PYTHONPATH"
fi
