"""The synthetic Severstal-like archive and the mask geometry it is checked against."""
