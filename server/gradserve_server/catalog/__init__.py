"""Tables of what a spec may name: layers, expression functions, losses, optimizers, schedules."""
