"""Writing the phantom to disk in the `nifti` layout (images/, labels/, annotations.csv)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from cmb.data.io import temp_folder
from cmb.data.phantom import PRESETS, PhantomGenerator, PhantomPreset, preset_json
from cmb.data.physics_phantom import PHYSICS_PRESETS, PhysicsPhantomGenerator
from cmb.errors import ConfigError, DataError

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
ALL_PRESETS: dict = {**PRESETS, **PHYSICS_PRESETS}  # painted phantoms (cmb.data.phantom) and SWI-physics ones


def generator_for(spec: object, seed: int) -> PhantomGenerator | PhysicsPhantomGenerator:
    """The generator of a preset's family."""
    return PhantomGenerator(spec, seed) if isinstance(spec, PhantomPreset) else PhysicsPhantomGenerator(spec, seed)  # type: ignore[arg-type]


def write_synthetic_dataset(out_dir: Path, preset: str, seed: int, n_scans: int | None = None, progress: bool = True) -> Path:
    """Generate every scan of a preset into `out_dir` (must not exist yet), atomically."""
    if preset not in ALL_PRESETS:
        raise ConfigError(f"unknown synthetic preset {preset!r}; choose one of {sorted(ALL_PRESETS)}")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise DataError(out_dir, "output folder already exists; refusing to overwrite")
    spec = ALL_PRESETS[preset]
    if n_scans is not None:
        from dataclasses import replace

        spec = replace(spec, n_scans=int(n_scans))
    generator = generator_for(spec, seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_folder(out_dir.parent, f".{out_dir.name}-")
    try:
        (tmp / "images").mkdir()
        (tmp / "labels").mkdir()
        rows, infos = [], []
        for index in tqdm(range(spec.n_scans), desc=f"synthetic {preset}", disable=not progress):
            scan = generator.generate(index)
            scan_id = f"synth{index:03d}"
            image = np.clip(np.rint(scan.image), 0, 32767).astype(np.int16)
            nib.save(nib.Nifti1Image(image, scan.affine), tmp / "images" / f"{scan_id}.nii.gz")
            nib.save(nib.Nifti1Image(scan.instances.astype(np.int16), scan.affine), tmp / "labels" / f"{scan_id}.nii.gz")
            rows += [f"{scan_id},{c[0]:.3f},{c[1]:.3f},{c[2]:.3f}" for c in scan.centroids_vox]
            infos.append({"scan_id": scan_id, **scan.info})
        (tmp / "centroids.csv").write_text("scan_id,i,j,k\n" + "".join(r + "\n" for r in rows))
        meta = {"preset": preset, "seed": seed, "format_version": FORMAT_VERSION, "spec": json.loads(preset_json(spec)), "scans": infos}
        (tmp / "phantom.json").write_text(json.dumps(meta, indent=1))
        try:
            tmp.rename(out_dir)
        except OSError:
            if not (out_dir / "phantom.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process wrote the same dataset first: use its copy
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def ensure_synthetic_dataset(preset: str, seed: int, cache_dir: Path, n_scans: int | None = None) -> Path:
    """Path of the cached synthetic dataset, generating it on first use."""
    if preset not in ALL_PRESETS:
        raise ConfigError(f"unknown synthetic preset {preset!r}; choose one of {sorted(ALL_PRESETS)}")
    suffix = f"-n{n_scans}" if n_scans is not None else ""
    spec = hashlib.sha256(preset_json(ALL_PRESETS[preset]).encode()).hexdigest()[:8]  # a preset whose content changes gets a new folder
    root = Path(cache_dir).expanduser() / "synthetic" / f"{preset}-seed{seed}{suffix}-{spec}-v{FORMAT_VERSION}"
    if not (root / "phantom.json").is_file():
        log.info("generating synthetic %s dataset into %s", preset, root)
        if root.exists():
            raise DataError(root, "incomplete synthetic dataset in the cache (no phantom.json); delete the folder")
        write_synthetic_dataset(root, preset, seed, n_scans=n_scans)
    return root


def main(argv: list[str] | None = None) -> int:
    """`python -m cmb.data.synthetic OUT_DIR [--preset demo] [--seed 0]`: write the phantom in the nifti layout."""
    import argparse
    import sys

    from cmb.errors import CMBError

    parser = argparse.ArgumentParser(prog="python -m cmb.data.synthetic", description=main.__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--preset", default="demo", choices=sorted(ALL_PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-scans", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        out = write_synthetic_dataset(args.out_dir, args.preset, args.seed, n_scans=args.n_scans)
    except CMBError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"written: {out}/images, {out}/labels, {out}/centroids.csv (open them in any NIfTI viewer)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
