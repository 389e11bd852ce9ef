"""Trainer machinery shared by the trainer families (mixins and helpers, no ``nnUNetTrainer*`` classes)."""
