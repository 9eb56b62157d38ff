"""The ``dicom-node convert`` subcommands: a DICOM series to HDF5 + JSON, and HDF5 back to DICOM."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dicom_node.cli.main import CommandParsers


def cmd_to_hdf5(args: argparse.Namespace) -> int:
    """Convert a DICOM series folder to HDF5 and a JSON header."""
    from offline.hdf5 import ConversionError, to_hdf5

    try:
        volume = to_hdf5(args.dicom_dir, args.out_h5, args.out_json)
    except ConversionError as exc:
        print(f"cannot convert: {exc}", file=sys.stderr)
        return 1
    spacing = ", ".join(f"{s:g}" for s in volume.spacing_mm)
    print(f"{args.out_h5}: {volume.shape[0]} slices of {volume.shape[1]}x{volume.shape[2]}, "
          f"spacing ({spacing}) mm; header in {args.out_json}")
    return 0


def cmd_to_dicom(args: argparse.Namespace) -> int:
    """Write an HDF5 volume as a new DICOM series with a template series' headers."""
    from offline.hdf5 import ConversionError, to_dicom

    try:
        paths = to_dicom(args.in_h5, args.template_dir, args.out_dir,
                         series_description=args.series_description, series_number=args.series_number)
    except ConversionError as exc:
        print(f"cannot convert: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(paths)} image(s) to {args.out_dir}")
    return 0


def add_parsers(parsers: CommandParsers) -> None:
    """Add ``convert to-hdf5`` and ``convert to-dicom`` to the ``dicom-node`` command (a ``dicom_node.commands`` entry point).

    Parameters
    ----------
    parsers
        Where ``dicom-node`` takes its installed commands.
    """
    convert = parsers.commands.add_parser("convert", help="convert between DICOM series and HDF5 volumes")
    sub = convert.add_subparsers(dest="direction", required=True)
    p = sub.add_parser("to-hdf5", help="DICOM series folder -> HDF5 volume + JSON header")
    p.add_argument("dicom_dir", type=Path)
    p.add_argument("out_h5", type=Path)
    p.add_argument("out_json", type=Path)
    p.set_defaults(func=cmd_to_hdf5)
    p = sub.add_parser("to-dicom", help="HDF5 volume + template series folder -> new DICOM series")
    p.add_argument("in_h5", type=Path)
    p.add_argument("template_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--series-description", default="From HDF5")
    p.add_argument("--series-number", type=int, default=9905)
    p.set_defaults(func=cmd_to_dicom)
