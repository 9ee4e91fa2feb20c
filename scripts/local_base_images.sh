#!/usr/bin/env bash
# Stand-ins for the base images the CPU image and the compose file name, made from Debian's archive: for CI and
# air-gapped machines that reach a Debian mirror (and PyPI) but no image registry. With a registry, use the real
# images (python:*-slim, valkey/valkey) and do not run this.
#
#   scripts/local_base_images.sh            # make the images below (each only if missing; FORCE=1 remakes them)
#
# Images (then build and run with the variables it prints, e.g. in deploy/docker/.env):
#   fuseflow-local/debian:bookworm      debootstrap --variant=minbase bookworm, imported with `docker import`
#   fuseflow-local/python:3.11-bookworm bookworm's python3.11 + venv and headers (python:*-slim carries them too:
#                                       DeepSpeed compiles an op against them), `python` on PATH, and this machine's
#                                       CA bundle for pip (the PYTHON_IMAGE build argument of Dockerfile.cpu)
#   fuseflow-local/redis:7.0-bookworm   bookworm's redis-server 7.0, also named valkey-server / valkey-cli as the
#                                       compose file calls them (REDIS_IMAGE)
# and, when pip's find-links on this machine hold the CPU torch wheel Dockerfile.cpu pins, a hard link (or copy) of
# it in deploy/docker/wheels/, which the build installs instead of downloading torch from the PyTorch index.
#
# Environment: DEBIAN_MIRROR (default: the first deb.debian.org-style URI apt uses here), DOCKER (default: the
# docker client in /usr/bin, not an older one earlier on PATH), HOST_CA_BUNDLE (default: pip's `cert`, else
# /etc/ssl/certs/ca-certificates.crt), FORCE=1.
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKER="${DOCKER:-$( [ -x /usr/bin/docker ] && echo /usr/bin/docker || command -v docker )}"
SUITE=bookworm
DEBIAN_IMAGE=fuseflow-local/debian:$SUITE
PYTHON_IMAGE=fuseflow-local/python:3.11-$SUITE
REDIS_IMAGE=fuseflow-local/redis:7.0-$SUITE
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' deploy/docker/Dockerfile.cpu)

have() { [[ "${FORCE:-0}" != 1 ]] && "$DOCKER" image inspect "$1" >/dev/null 2>&1; }
say() { printf '== %s\n' "$*"; }
# pip_setting NAME: a value of pip's configuration on this machine (`pip config list`), empty if unset.
pip_setting() { python3 -m pip config list 2>/dev/null | sed -n "s/^[^=]*\.$1='\(.*\)'\$/\1/p" | head -n 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# ---------------------------------------------------------------------------------------------- debian
if have "$DEBIAN_IMAGE"; then
    say "$DEBIAN_IMAGE: present"
else
    mirror="${DEBIAN_MIRROR:-}"
    if [[ -z "$mirror" ]]; then  # the mirror apt already uses (deb822 or one-line sources), else Debian's CDN
        mirror=$(grep -hoE '^(URIs:|deb) +https?://[^ ]+' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list \
                 2>/dev/null | grep -v security | awk '{print $2}' | head -n 1 || true)
        mirror="${mirror:-http://deb.debian.org/debian}"
    fi
    say "$DEBIAN_IMAGE: debootstrap --variant=minbase $SUITE from $mirror"
    command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install -y debootstrap" >&2; exit 1; }
    debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$tmp/rootfs" "$mirror" >"$tmp/debootstrap.log" 2>&1 \
        || { tail -n 30 "$tmp/debootstrap.log" >&2; exit 1; }
    rm -rf "$tmp/rootfs/var/cache/apt/archives/"*.deb "$tmp/rootfs/var/lib/apt/lists/"*
    tar -C "$tmp/rootfs" -c . | "$DOCKER" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' - "$DEBIAN_IMAGE" >/dev/null
    rm -rf "$tmp/rootfs"
fi

# ---------------------------------------------------------------------------------------------- python
if have "$PYTHON_IMAGE"; then
    say "$PYTHON_IMAGE: present"
else
    # pip inside a container trusts only its own bundle; where TLS to PyPI is re-signed by a local CA, this
    # machine's bundle (the one its own pip uses) is what makes PyPI reachable from the build.
    ca="${HOST_CA_BUNDLE:-$(pip_setting cert)}"
    ca="${ca:-/etc/ssl/certs/ca-certificates.crt}"
    mkdir -p "$tmp/python"
    cp "$ca" "$tmp/python/host-ca-bundle.crt"
    cat > "$tmp/python/Dockerfile" <<EOF
FROM $DEBIAN_IMAGE
RUN apt-get update \\
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev python-is-python3 \\
    && rm -rf /var/lib/apt/lists/*
COPY host-ca-bundle.crt /etc/ssl/certs/fuseflow-host-ca-bundle.crt
RUN printf '[global]\ncert = /etc/ssl/certs/fuseflow-host-ca-bundle.crt\n' > /etc/pip.conf
CMD ["python3"]
EOF
    say "$PYTHON_IMAGE: bookworm's python3 + venv (CA bundle from $ca)"
    "$DOCKER" build -q -t "$PYTHON_IMAGE" "$tmp/python" >/dev/null
fi

# ---------------------------------------------------------------------------------------------- redis
if have "$REDIS_IMAGE"; then
    say "$REDIS_IMAGE: present"
else
    mkdir -p "$tmp/redis"
    cat > "$tmp/redis/Dockerfile" <<EOF
FROM $DEBIAN_IMAGE
RUN apt-get update \\
    && apt-get install -y --no-install-recommends redis-server \\
    && rm -rf /var/lib/apt/lists/* \\
    && ln -s /usr/bin/redis-server /usr/local/bin/valkey-server \\
    && ln -s /usr/bin/redis-cli /usr/local/bin/valkey-cli \\
    && mkdir -p /data && chown redis:redis /data
USER redis
WORKDIR /data
EXPOSE 6379
CMD ["redis-server", "--protected-mode", "no"]
EOF
    say "$REDIS_IMAGE: bookworm's redis-server, as valkey-server"
    "$DOCKER" build -q -t "$REDIS_IMAGE" "$tmp/redis" >/dev/null
fi

# ---------------------------------------------------------------------------------------------- torch wheel
wheel_dir=deploy/docker/wheels
found=""
for dir in $(pip_setting find-links) ${PIP_FIND_LINKS:-}; do
    for w in "$dir"/torch-"$TORCH_VERSION"+cpu-*.whl; do [[ -e "$w" ]] && found="$w"; done
done
if [[ -n "$found" ]]; then
    if [[ ! -e "$wheel_dir/$(basename "$found")" ]]; then
        ln -f "$found" "$wheel_dir/" 2>/dev/null || cp "$found" "$wheel_dir/"
    fi
    say "torch wheel: $wheel_dir/$(basename "$found")"
else
    say "torch wheel: none in pip's find-links; the build downloads torch==$TORCH_VERSION from its index"
fi

echo
echo "Build and run with (deploy/docker/.env, or the environment):"
echo "FUSEFLOW_PYTHON_IMAGE=$PYTHON_IMAGE"
echo "REDIS_IMAGE=$REDIS_IMAGE"
