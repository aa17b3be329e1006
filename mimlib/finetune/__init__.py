"""Fine-tuning tasks (paper section 2.5): ImageNet-1K / iNaturalist-18 classification, COCO
Mask R-CNN detection + instance segmentation, ADE20K UPerNet semantic segmentation."""
