#!/usr/bin/env bash
# Builds the Debian package: the release binary, its man pages and shell
# completions (generated from the CLI itself), then `cargo deb`. With
# --install, installs it with dpkg and checks the installed files: the
# example config passes the installed `portshift check`, --version names
# the build, and the unit, man page and completions are where Debian looks.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-deb >/dev/null; then
  cargo install cargo-deb --locked --quiet
fi
cargo build --release --locked
bin=target/release/portshift
rm -rf target/man target/completions
"$bin" man --dir target/man
mkdir -p target/completions
"$bin" completions bash > target/completions/portshift.bash
"$bin" completions zsh > target/completions/_portshift
"$bin" completions fish > target/completions/portshift.fish
deb=$(cargo deb --no-build --quiet 2>/dev/null | tail -1)
[ -f "$deb" ] || deb=$(ls -t target/debian/portshift_*.deb | head -1)
echo "built: $deb"

if [ "${1:-}" = "--install" ]; then
  dpkg -i "$deb"
  /usr/bin/portshift --version
  /usr/bin/portshift check -c /etc/portshift/portshift.toml
  for f in /lib/systemd/system/portshift.service /usr/share/man/man1/portshift.1.gz \
    /usr/share/man/man1/portshift-run.1.gz /usr/share/bash-completion/completions/portshift \
    /usr/share/portshift/policies/failover.toml /usr/share/portshift/dashboards/portshift.json; do
    [ -s "$f" ] || { echo "missing from the package: $f" >&2; exit 1; }
  done
  dpkg -L portshift | grep -q "^/usr/share/zsh/vendor-completions/_portshift$"
  zcat /usr/share/man/man1/portshift.1.gz | grep -q "^.TH portshift 1"
  echo "installed and checked: $(dpkg-query -W -f '${Package} ${Version}' portshift)"
fi
