"""Body composition in batch: the CSV runner, folder organisation and the training commands."""
