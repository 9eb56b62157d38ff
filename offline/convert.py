"""The ``dicom-node convert`` subcommands: a DICOM series to HDF5 + JSON, and HDF5 back to DICOM."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dicom_node.cli.main import CommandParsers


def _pick(parser: argparse.ArgumentParser, args: argparse.Namespace, positional: str, flag: str,
          spelling: str) -> Path:
    given = [v for v in (getattr(args, positional), getattr(args, flag)) if v is not None]
    if len(given) == 2 and given[0] != given[1]:
        parser.error(f"{positional.upper()} and {spelling} name the same input; give one of them")
    if not given:
        parser.error(f"give {positional.upper()} or {spelling}")
    return Path(given[0])


def cmd_to_hdf5(args: argparse.Namespace) -> int:
    """Convert a DICOM series folder to HDF5 and a JSON header."""
    from offline.hdf5 import ConversionError, to_hdf5

    parser = args.parser
    dicom_dir = _pick(parser, args, "dicom_dir", "input_dicom", "-i/--input-dicom")
    out_h5 = _pick(parser, args, "out_h5", "hdf5", "-h/--hdf5")
    out_json = _pick(parser, args, "out_json", "json", "-j/--json")
    try:
        volume = to_hdf5(dicom_dir, out_h5, out_json)
    except ConversionError as exc:
        print(f"cannot convert: {exc}", file=sys.stderr)
        return 1
    spacing = ", ".join(f"{s:g}" for s in volume.spacing_mm)
    print(f"{out_h5}: {volume.shape[0]} slices of {volume.shape[1]}x{volume.shape[2]}, "
          f"spacing ({spacing}) mm; header in {out_json}")
    return 0


def cmd_to_dicom(args: argparse.Namespace) -> int:
    """Write an HDF5 volume as a new DICOM series with a template series' (or one image's) headers."""
    from offline.hdf5 import ConversionError, to_dicom

    parser = args.parser
    in_h5 = _pick(parser, args, "in_h5", "hdf5", "-h/--hdf5")
    template = _pick(parser, args, "template", "template_dicom", "-d/--template-dicom")
    out_dir = _pick(parser, args, "out_dir", "output_dicom", "-o/--output-dicom")
    try:
        paths = to_dicom(in_h5, template, out_dir,
                         series_description=args.series_description, series_number=args.series_number)
    except ConversionError as exc:
        print(f"cannot convert: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(paths)} image(s) to {out_dir}")
    return 0


def add_parsers(parsers: CommandParsers) -> None:
    """Add ``convert to-hdf5`` and ``convert to-dicom`` (a ``dicom_node.commands`` entry point).

    Both take their paths as positional arguments or with the flags of the processing
    pipeline's ``dicom_to_hd5.py`` and ``hd5_to_dicom.py`` (``-i``, ``-h``, ``-j``; ``-h``,
    ``-d``, ``-o``): ``-h`` is the HDF5 path there, so help is ``--help`` only.

    Parameters
    ----------
    parsers
        Where ``dicom-node`` takes its installed commands.
    """
    convert = parsers.commands.add_parser("convert", help="convert between DICOM series and HDF5 volumes")
    sub = convert.add_subparsers(dest="direction", required=True)
    p = sub.add_parser("to-hdf5", help="DICOM series folder -> HDF5 volume + JSON header", add_help=False,
                       usage="dicom-node convert to-hdf5 [--help] (DICOM_DIR OUT_H5 OUT_JSON | -i DICOM_DIR "
                             "-h OUT_H5 -j OUT_JSON)")
    p.add_argument("--help", action="help", help="show this help message and exit")
    p.add_argument("dicom_dir", type=Path, nargs="?", help="folder of one DICOM series (or -i)")
    p.add_argument("out_h5", type=Path, nargs="?", help="HDF5 file to write (or -h)")
    p.add_argument("out_json", type=Path, nargs="?", help="JSON header to write (or -j)")
    p.add_argument("-i", "--input-dicom", type=Path, help="folder of one DICOM series")
    p.add_argument("-h", "--hdf5", type=Path, help="HDF5 file to write")
    p.add_argument("-j", "--json", type=Path, help="JSON header to write")
    p.set_defaults(func=cmd_to_hdf5, parser=p)
    p = sub.add_parser("to-dicom", help="HDF5 volume + template series folder or image -> new DICOM series",
                       add_help=False,
                       usage="dicom-node convert to-dicom [--help] (IN_H5 TEMPLATE OUT_DIR | -h IN_H5 -d TEMPLATE "
                             "-o OUT_DIR) [--series-description TEXT] [--series-number N]")
    p.add_argument("--help", action="help", help="show this help message and exit")
    p.add_argument("in_h5", type=Path, nargs="?", help="HDF5 volume (or -h)")
    p.add_argument("template", type=Path, nargs="?",
                   help="template series folder, or one template DICOM file (or -d)")
    p.add_argument("out_dir", type=Path, nargs="?", help="folder for the new series (or -o)")
    p.add_argument("-h", "--hdf5", type=Path, help="HDF5 volume to read")
    p.add_argument("-d", "--template-dicom", type=Path, help="template series folder or one template DICOM file")
    p.add_argument("-o", "--output-dicom", type=Path, help="folder for the new series")
    p.add_argument("--series-description", default="From HDF5")
    p.add_argument("--series-number", type=int, default=9905)
    p.set_defaults(func=cmd_to_dicom, parser=p)
