#!/bin/sh
# uc_predict.sh DATA -i IN -o OUT -t ID [-s ROI] [-f 0 1 2 3 4]
# The universal classifier's shell wrapper: runs the uc_predict command of this package with the
# same arguments. DATA holds raw/nnUNet_raw_data, preprocessed and trained_models (or the tasks
# themselves); nnUNet_raw_data_base, nnUNet_preprocessed and RESULTS_FOLDER, where exported,
# replace those folders. PYTHON names the interpreter (default python3).
exec "${PYTHON:-python3}" -c 'import sys; from offline.uc_commands import predict_main; sys.exit(predict_main())' "$@"
