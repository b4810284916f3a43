"""What people look at: the HTML report with its plots and overlays, and COCO files for
review in CVAT or Label Studio."""
