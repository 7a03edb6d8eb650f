"""partinfer online runtime: model, partial loader, neuron selection, generation, chat."""
