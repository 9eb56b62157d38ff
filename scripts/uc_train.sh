#!/bin/sh
# uc_train.sh DATA 3d_fullres ClassifierTrainer TASKID FOLD [--validation_only]
# The universal classifier's shell wrapper: runs the uc_train command of this package with the
# same arguments. DATA holds raw/nnUNet_raw_data, preprocessed and trained_models (or the tasks
# themselves); nnUNet_raw_data_base, nnUNet_preprocessed and RESULTS_FOLDER, where exported,
# replace those folders. PYTHON names the interpreter (default python3).
exec "${PYTHON:-python3}" -c 'import sys; from offline.uc_commands import train_main; sys.exit(train_main())' "$@"
