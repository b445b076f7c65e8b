"""Reading and writing image directories and reports."""
