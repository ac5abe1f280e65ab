"""Pictures from plain arrays and files: scan sections, saliency maps, training curves, evaluation plots."""
