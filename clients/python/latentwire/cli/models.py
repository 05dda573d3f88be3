"""`latentwire models ...`: the model registry from the command line.

    latentwire models import PATH [--name N] [--alias A ...] [--tag K=V ...] [--allow-pickle] [--new-version]
    latentwire models list
    latentwire models show NAME[@REF]
    latentwire models alias NAME ALIAS VERSION        (or: alias NAME ALIAS --delete)
    latentwire models tag NAME[@VERSION] KEY VALUE    (or: tag NAME KEY --delete)
    latentwire models rm NAME[@VERSION] [--force]   (a version an alias points at needs --force)
    latentwire models download NAME[@REF] DEST [--component C ...]
    latentwire models gc [--dry-run]                 remove abandoned uploads and blobs no version lists

Every command takes --registry ADDR (default $LATENTWIRE_REGISTRY, else localhost:50055).
"""
from __future__ import annotations

import argparse
import datetime
import sys


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _time(stamp) -> str:
    """A google.protobuf.Timestamp in the local time zone, to the second."""
    return stamp.ToDatetime(tzinfo=datetime.timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _kind(kind: int) -> str:
    from latentwire.registry.v1 import registry_pb2

    return registry_pb2.ModelKind.Name(kind).removeprefix("MODEL_KIND_").lower()


def _split_ref(value: str) -> tuple[str, str]:
    name, _, ref = value.partition("@")
    return name, ref


def _version_number(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{value!r} is not a version number (1, 2, ...)")
    return int(value)


def _parse_tags(values: list[str]) -> dict[str, str]:
    tags = {}
    for value in values:
        key, sep, text = value.partition("=")
        if not sep:
            raise ValueError(f"--tag {value!r}: use KEY=VALUE")
        tags[key] = text
    return tags


def cmd_import(args, registry) -> int:
    from latentwire.client.registry import scan_folder

    # Scanned here only to show what was found before a long upload; RegistryClient.import_folder does the rest.
    manifest = scan_folder(args.path, allow_pickle=args.allow_pickle)
    print(f"{manifest.root}: {_kind(manifest.kind)}, {len(manifest.files)} files, {_size(manifest.size_bytes)}"
          + (f", components {', '.join(manifest.components)}" if manifest.components else ""), file=sys.stderr)
    imported = registry.import_folder(manifest, args.name, aliases=args.alias, tags=_parse_tags(args.tag),
                                      description=args.description, new_version=args.new_version)
    version = imported.model_version
    print(f"uploaded {imported.blobs_uploaded} blob(s), {_size(imported.bytes_sent)}; "
          f"{imported.blobs_present} already stored", file=sys.stderr)
    if not imported.created:
        print(f"{version.model_id}@{version.version} holds these files already: no new version "
              "(--new-version records one anyway)", file=sys.stderr)
    if args.alias:
        print(f"aliases {', '.join(args.alias)} -> version {version.version}", file=sys.stderr)
    print(f"{version.model_id}@{version.version}")  # stdout holds just the reference, for scripts
    return 0


def cmd_list(args, registry) -> int:
    rows = [("MODEL", "LATEST", "ALIASES", "TAGS")]
    for model in registry.iter_models(page_size=args.page_size):
        rows.append((
            model.model_id,
            str(model.latest_version),
            ", ".join(f"{a}->{v}" for a, v in sorted(model.aliases.items())),
            ", ".join(f"{k}={v}" for k, v in sorted(model.tags.items())),
        ))
    if len(rows) == 1:
        print("no models", file=sys.stderr)
        return 0
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _print_version(version, *, files: bool) -> None:
    print(f"{version.name}  {_kind(version.kind)}  {_time(version.create_time)}")
    print(f"  source: {version.source}")
    if version.description:
        print(f"  description: {version.description}")
    if version.components:
        print(f"  components: {', '.join(version.components)}")
    for key, value in sorted(version.tags.items()):
        print(f"  tag {key} = {value}")
    total = sum(f.size_bytes for f in version.files)
    print(f"  files: {len(version.files)}, {_size(total)}")
    if files:
        for f in version.files:
            print(f"    {f.sha256[:12]}  {_size(f.size_bytes):>9}  {f.path}")


def cmd_show(args, registry) -> int:
    name, ref = _split_ref(args.ref)
    if ref:
        _print_version(registry.resolve(args.ref), files=True)
        return 0
    model = registry.get_model(name)
    print(f"{model.name}  latest version {model.latest_version}  created {_time(model.create_time)}")
    if model.description:
        print(f"  description: {model.description}")
    for alias, version in sorted(model.aliases.items()):
        print(f"  alias {alias} -> {version}")
    for key, value in sorted(model.tags.items()):
        print(f"  tag {key} = {value}")
    for version in registry.iter_model_versions(name):
        _print_version(version, files=False)
    return 0


def cmd_alias(args, registry) -> int:
    if args.delete:
        registry.delete_alias(args.name, args.alias)
        print(f"removed alias {args.alias} of {args.name}")
        return 0
    if args.version is None:
        raise ValueError("give the VERSION the alias points at, or --delete")
    model = registry.set_alias(args.name, args.alias, _version_number(args.version))
    print(f"{model.model_id}@{args.alias} -> {model.aliases[args.alias]}")
    return 0


def cmd_tag(args, registry) -> int:
    name, ref = _split_ref(args.ref)
    if args.delete:
        if ref:
            raise ValueError("the registry has no call to remove a version's tag; set it to another value")
        registry.delete_model_tag(name, args.key)
        print(f"removed tag {args.key} of {name}")
        return 0
    if args.value is None:
        raise ValueError("give the tag's VALUE, or --delete")
    if ref:
        registry.set_model_version_tag(name, _version_number(ref), args.key, args.value)
    else:
        registry.set_model_tag(name, args.key, args.value)
    print(f"{args.ref}: {args.key} = {args.value}")
    return 0


def cmd_rm(args, registry) -> int:
    name, ref = _split_ref(args.ref)
    if ref:
        version = _version_number(ref)
        aliases = sorted(alias for alias, target in registry.get_model(name).aliases.items() if target == version)
        if aliases and not args.force:
            # Deleting the version deletes its aliases too: whoever resolves NAME@ALIAS would lose the model.
            listed = ", ".join(aliases)
            raise ValueError(f"{name}@{version} is what alias {listed} of {name} points at; move the alias first "
                             f"(latentwire models alias {name} {aliases[0]} OTHER_VERSION), or pass --force to "
                             f"delete the version and the alias with it")
        registry.delete_model_version(name, version)
    else:
        registry.delete_model(name)
    print(f"removed {args.ref}")
    return 0


def cmd_download(args, registry) -> int:
    result = registry.download_files(args.ref, args.dest, args.component or None, allow_pickle=args.allow_pickle)
    print(f"{len(result.files)} file(s) in {result.folder}: {result.blobs_downloaded} downloaded "
          f"({_size(result.bytes_received)}), {result.blobs_reused} already there", file=sys.stderr)
    print(result.folder)
    return 0


def cmd_gc(args, registry) -> int:
    garbage = registry.collect_garbage(dry_run=args.dry_run)
    verb = "would remove" if garbage.dry_run else "removed"
    print(f"{verb} {garbage.partial_uploads_removed} abandoned upload(s) ({_size(garbage.partial_upload_bytes)}) "
          f"and {garbage.blobs_removed} blob(s) no version lists ({_size(garbage.blob_bytes)}); "
          f"{'would free' if garbage.dry_run else 'freed'} {_size(garbage.partial_upload_bytes + garbage.blob_bytes)}")
    return 0


def _run(command):
    """Wrap a command: open the client; print a refused folder or argument as one line and exit 1.
    (Failed calls are LatentwireErrors, reported by cli.main.run like every command's.)"""

    def run(args: argparse.Namespace) -> int:
        from latentwire.client.registry import ModelFilesError, RegistryClient
        from latentwire.client.security import OPERATOR_NAME

        from .connection import client_kwargs

        # The registry takes no token (mutual TLS only); changing it is for operators.
        security = client_kwargs(args, identity=OPERATOR_NAME)["security"]
        try:
            with RegistryClient(args.registry, timeout=args.timeout, security=security) as registry:
                return command(args, registry)
        except BrokenPipeError:
            raise  # the reader of stdout went away (`models list | head`): cli.main.run ends quietly
        except (ModelFilesError, ValueError, OSError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1

    return run


def add_commands(models: argparse._SubParsersAction) -> None:
    """Add the registry commands to `latentwire models`."""

    def add(name: str, command, help: str) -> argparse.ArgumentParser:
        p = models.add_parser(name, help=help)
        p.add_argument("--registry", default=None,
                       help="registry address host:port (default: $LATENTWIRE_REGISTRY, else localhost:50055)")
        p.add_argument("--timeout", type=float, default=60.0, help="deadline of each registry call, in seconds")
        from .connection import add_flags; add_flags(p, token=False)  # noqa: E702 - --tls-* (cli/connection.py)
        p.set_defaults(func=_run(command))
        return p

    p = add("import", cmd_import, "import a diffusers, transformers or Hugging Face snapshot folder, or a LoRA / "
                                     "textual-inversion .safetensors file, as a new version (none when an --alias "
                                     "already names one with these files)")
    p.add_argument("path", help="model folder (or models--org--name/snapshots/<rev>/ of a Hugging Face cache), or a "
                                "LoRA (diffusers, PEFT, kohya) or A1111 embedding .safetensors file")
    p.add_argument("--name", default=None, help="model name (default: the folder's or the repo's name)")
    p.add_argument("--alias", action="append", default=[], help="alias to point at the new version; repeatable")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="tag on the new version; repeatable")
    p.add_argument("--description", default="", help="free text describing the version")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also import pickle-based weights (.bin/.ckpt/.pt/.pth/.pkl); unpickling can run code")
    p.add_argument("--new-version", action="store_true",
                   help="record a new version even when an --alias already names one with the same files")

    p = add("list", cmd_list, "list the registered models")
    p.add_argument("--page-size", type=int, default=100, help="models fetched per call")

    p = add("show", cmd_show, "show a model and its versions, or one version's files (NAME@VERSION or NAME@ALIAS)")
    p.add_argument("ref", metavar="NAME[@REF]")

    p = add("alias", cmd_alias, "point an alias of a model at a version (moving it atomically)")
    p.add_argument("name")
    p.add_argument("alias")
    p.add_argument("version", nargs="?", default=None)
    p.add_argument("--delete", action="store_true", help="remove the alias instead")

    p = add("tag", cmd_tag, "set a tag on a model or on one version (NAME@VERSION)")
    p.add_argument("ref", metavar="NAME[@VERSION]")
    p.add_argument("key")
    p.add_argument("value", nargs="?", default=None)
    p.add_argument("--delete", action="store_true", help="remove the model's tag instead")

    p = add("rm", cmd_rm, "delete a model with all its versions, or one version (NAME@VERSION)")
    p.add_argument("ref", metavar="NAME[@VERSION]")
    p.add_argument("--force", action="store_true",
                   help="delete a version even while an alias points at it (the alias goes with it)")

    p = add("download", cmd_download, "download a version's files into a folder (resumable, verified)")
    p.add_argument("ref", metavar="NAME[@REF]")
    p.add_argument("dest", help="folder to write")
    p.add_argument("--component", action="append", default=[], help="only this component (and top-level files); repeatable")
    p.add_argument("--allow-pickle", action="store_true", help="also fetch pickle-based weight files")

    p = add("gc", cmd_gc, "remove abandoned uploads and blobs no version lists (the registry also does this "
                          "on start and every --gc-interval-seconds)")
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
