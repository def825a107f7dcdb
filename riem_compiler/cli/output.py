"""`riem-compile`'s output: checks on OUT and --report (symlinks, clobbering an input), the
staging folder, publishing it into OUT, and the report files (each optional: never an exit)."""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
import traceback
from pathlib import Path

from riem_compiler.cli.common import OutputError, _first_line, log
from riem_compiler.errors import InputError
from riem_compiler.files import atomic_write, public_mode

# files the tool may put into OUT; moved last so a reader never sees a manifest without its data
LAST_FILES = ("manifest.json", "model.onnx")
# names the tool may write into OUT besides report.json/report.png; --report must not be one of them
ARTIFACT_NAMES = ("model.onnx", "model.onnx.data", "model.so", "params.safetensors", "manifest.json",
                  "cuda_source.cu", "tuning")


def output_dir(out: Path) -> Path:
    """The real directory OUT names (symlinks and `..` resolved). A symlink to a directory is
    written through (the files go into its target, the link stays); a dangling symlink, a
    symlink loop or a symlink to a non-directory is refused (OutputError, exit 4)."""
    try:
        if out.is_symlink():
            try:
                target = out.resolve(strict=True)
            except (OSError, RuntimeError):  # dangling, or a loop
                raise OutputError(f"{out} is a symlink to {os.readlink(out)!r}, which does not exist; create "
                                  "that directory or pass another -o") from None
            if not target.is_dir():
                raise OutputError(f"{out} is a symlink to {target}, which is not a directory; -o takes a directory")
            return target
        return out.resolve()
    except (OSError, RuntimeError) as exc:  # name too long, a loop further up the path, ...
        raise OutputError(f"cannot write to {out}: {getattr(exc, 'strerror', None) or exc}") from None


def check_inputs_kept(out: Path, report: Path | None, inputs, plot: bool = True) -> None:
    """Refuse (InputError, exit 2) before any fitting an OUT that is, or holds, an input file
    (publishing would replace or delete it) and a --report whose JSON or PNG is an input or
    would be overwritten by an artifact in OUT. Paths are compared with symlinks and `..` resolved."""
    real_inputs = {}
    for given in inputs:
        real = _resolved(given)
        if real is not None:
            real_inputs.setdefault(real, Path(given))
    real_out = _resolved(out)  # None (a symlink loop): prepare_output refuses it
    for real, given in real_inputs.items():
        if real_out is not None and (real == real_out or real_out in real.parents):
            how = "is" if real == real_out else "contains"
            raise InputError(f"-o {out} {how} the input {given}; writing the output there would replace it. "
                             "Choose another output directory")
    if report is None:
        return
    png = report.with_suffix(".png")
    paths = [(report, f"--report {report}")] + [(png, f"the report picture {png} (beside --report)")] * plot
    for path, what in paths:
        real = _resolved(path)
        if real is None:
            raise OutputError(f"cannot write {what}: symlink loop")
        if real in real_inputs:
            raise InputError(f"{what} is the input {real_inputs[real]}; choose another report path")
        if real.parent == real_out and real.name in ARTIFACT_NAMES:
            raise InputError(f"{what} would be overwritten by the output's {real.name}; choose another report path")


def _resolved(path) -> Path | None:
    if path is None or str(path) == "":
        return None
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):  # symlink loop
        return None


def prepare_output(out: Path) -> Path:
    """Check OUT can be written (before any fitting) and make the staging folder beside it
    (beside the target directory when OUT is a symlink, so that publishing is a rename)."""
    real = output_dir(out)
    try:
        if real.exists() and not real.is_dir():
            raise OutputError(f"{out} exists and is not a directory; -o takes a directory")
        real.parent.mkdir(parents=True, exist_ok=True)
        if real.is_dir() and not os.access(real, os.W_OK):
            raise PermissionError(f"no write permission on {out}")
        staging = Path(tempfile.mkdtemp(prefix=f".{real.name}.partial-", dir=real.parent))
        public_mode(staging, directory=True)
        return staging
    except OSError as exc:
        raise OutputError(f"cannot write to {out}: {exc.strerror or exc}") from None


def publish(staging: Path, out: Path) -> None:
    """Move the finished files into OUT: the whole folder at once (one rename) when OUT is new
    or an empty directory, else file by file (each an atomic rename), model/manifest last.
    Safe against another run publishing to the same OUT at the same time: whatever it put
    there first is replaced, never a crash; both leave a complete output."""
    real = output_dir(out)
    try:
        if real != Path.cwd().resolve():  # never rename over the working directory
            try:
                os.replace(staging, real)  # POSIX rename: succeeds for a new path or an empty directory
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise
        if not real.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory")
        replaced = Path(tempfile.mkdtemp(prefix=".replaced-", dir=staging))  # old folders, removed below
        for item in sorted(staging.iterdir(), key=lambda p: (p.name in LAST_FILES, p.name)):
            if item != replaced:
                _move_in(item, real / item.name, replaced)
        shutil.rmtree(staging)
    except OSError as exc:
        raise OutputError(f"cannot write to {out}: {exc.strerror or exc}") from None


def _move_in(item: Path, dest: Path, replaced: Path) -> None:
    """Rename item to dest. A directory in the way (or anything in the way of a directory) is
    first moved aside into `replaced`; retried if a concurrent run puts a new one there."""
    for attempt in range(20):
        if (dest.is_dir() and not dest.is_symlink()) or (item.is_dir() and (dest.exists() or dest.is_symlink())):
            try:
                os.replace(dest, replaced / f"{attempt}-{dest.name}")
            except FileNotFoundError:
                pass  # gone meanwhile (the other run moved it aside)
        try:
            os.replace(item, dest)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
    raise OSError(errno.EBUSY, f"{dest} keeps being replaced by another process")


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(_json_safe(data), indent=2, default=str) + "\n"))


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def _optional(args, what: str, fn) -> bool:
    """Run an optional step (report, plot, printing); a failure is one warning line, never an exit."""
    try:
        fn()
        return True
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        log.warning("could not %s (%s: %s); the model itself is written", what, type(exc).__name__, _first_line(exc))
        return False


def _write_reports(data: dict, res, json_path: Path, args, title: str) -> None:
    """report.json, then report.png beside it; each is optional (see _optional)."""
    if not _optional(args, f"write the report {json_path}", lambda: _write_json(json_path, data)) or args.no_plot:
        return
    try:
        import matplotlib  # noqa: F401  (an optional extra: riem-compiler[bench] or pip install matplotlib)
    except ImportError:
        log.warning("matplotlib is not installed: no report.png (pip install matplotlib)")
        return
    from riem_compiler.plots import save_report_png

    _optional(args, f"draw {json_path.with_suffix('.png')}",
              lambda: save_report_png(res.report, json_path.with_suffix(".png"), title))


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size

