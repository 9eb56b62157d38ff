"""Schedule: when a study is complete, which series each analysis needs, jobs and retention."""
