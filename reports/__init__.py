"""Result objects (SEG, SC, SR) built with highdicom from the analysed source series."""
