"""Body composition on CT: muscle, subcutaneous and visceral fat at a vertebral level (default L3)."""
