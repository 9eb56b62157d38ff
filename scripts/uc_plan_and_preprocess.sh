#!/bin/sh
# uc_plan_and_preprocess.sh DATA -t ID [ID ...] [-tf N] [-tl N]
# The universal classifier's shell wrapper: runs the uc_plan_and_preprocess command of this package with the
# same arguments. DATA holds raw/nnUNet_raw_data, preprocessed and trained_models (or the tasks
# themselves); nnUNet_raw_data_base, nnUNet_preprocessed and RESULTS_FOLDER, where exported,
# replace those folders. PYTHON names the interpreter (default python3).
exec "${PYTHON:-python3}" -c 'import sys; from offline.uc_commands import plan_and_preprocess_main; sys.exit(plan_and_preprocess_main())' "$@"
