"""The monitor's widgets: each one small, drawing from the shared RunStore."""
