"""The `partinfer` command line: one typer app, its commands registered from one module per command group.

Every command runs inside `ErrorHandlingGroup` (cli/errors.py): user mistakes are one line and exit 2.
"""

from __future__ import annotations

import typer

from partinfer.cli import measure, models, profiling, run, serve
from partinfer.cli.errors import ErrorHandlingGroup


def build_app() -> typer.Typer:
    app = typer.Typer(
        cls=ErrorHandlingGroup,
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        help="partinfer: run LLMs with a fraction of their FFN neurons loaded and computed (PartInfer + CoreInfer).",
    )
    app.command()(models.prepare)
    app.command("models")(models.models)
    app.command()(run.generate)
    app.command()(run.chat)
    app.command()(models.pack)
    app.command()(measure.bench)
    app.command()(measure.perplexity)
    app.command("eval")(measure.evaluate)
    app.command()(profiling.profile)
    app.command()(profiling.compensate)
    app.command()(measure.memory)
    app.command()(measure.pareto)
    app.command()(serve.serve)
    data_app = typer.Typer(cls=ErrorHandlingGroup, no_args_is_help=True, help="Offline data sets for profiling and evaluation.")
    data_app.command("fetch")(profiling.data_fetch)
    neurons_app = typer.Typer(cls=ErrorHandlingGroup, no_args_is_help=True,
                              help="Inspect and merge neuron files; measure their layers' sensitivity.")
    neurons_app.command("show")(profiling.neurons_show)
    neurons_app.command("merge")(profiling.neurons_merge)
    neurons_app.command("sensitivity")(profiling.neurons_sensitivity)
    neurons_app.command("contribution")(profiling.neurons_contribution)
    app.add_typer(data_app, name="data")
    app.add_typer(neurons_app, name="neurons")
    return app


app = build_app()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
