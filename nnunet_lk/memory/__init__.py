"""Training and inference memory of any network nnU-Net's plans build: measured (``tracker``), estimated from
shapes alone on the meta device (``estimate``), and planned for a memory target (``planner``)."""
