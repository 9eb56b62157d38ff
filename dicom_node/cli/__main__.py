"""``python -m dicom_node.cli``: the ``dicom-node`` command."""

import sys

from dicom_node.cli.main import main

sys.exit(main())
