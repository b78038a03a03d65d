"""Connected components of an edge DataFrame, computed in Spark (never collected on the driver).

Alternating large-star / small-star (Kiveris et al., "Connected Components in MapReduce and
Beyond", SoCC 2014): after O(log n) rounds the graph is a forest of stars whose centres are each
component's smallest node. Each star operation is one ``groupBy`` that collects a node's distinct
neighbours, followed by narrow array work (no joins, no ``distinct`` passes), so a round costs two
shuffles. Node ids are any orderable Spark type (here the ``doc_id`` strings, so there is no id
mapping and no collision risk).
"""

from __future__ import annotations


def _neighbourhoods(edges):
    """``(u, nbrs)``: every node of ``edges(src, dst)`` (read as undirected) with its distinct
    neighbours other than itself."""
    from pyspark.sql import functions as F

    both = edges.select(F.col("src").alias("u"), F.col("dst").alias("v")).unionByName(
        edges.select(F.col("dst").alias("u"), F.col("src").alias("v"))
    ).where(F.col("u") != F.col("v"))
    return both.groupBy("u").agg(F.collect_set("v").alias("nbrs"))


def _is_star_forest_violation():
    """True for a node that has a smaller neighbour and more than one neighbour: a graph without
    such a node is a forest of stars centred on each component's smallest node (a leaf's only
    neighbour is smaller, and that neighbour, having a larger one, has no smaller one)."""
    from pyspark.sql import functions as F

    return (F.size("nbrs") > 1) & F.exists("nbrs", lambda v: v < F.col("u"))


def _large_star_small_star(hoods):
    """One round on neighbourhoods ``(u, nbrs)``; returns the new edges ``(src, dst)``, src > dst.

    large-star: each neighbour larger than ``u`` is linked to m(u) = min(nbrs ∪ {u}); then
    small-star: each node ``u`` with (smaller) neighbours S links S ∪ {u} to min(S).
    """
    from pyspark.sql import functions as F

    m = F.least(F.array_min("nbrs"), F.col("u"))
    large = hoods.select(F.explode(F.filter("nbrs", lambda v: v > F.col("u"))).alias("src"), m.alias("dst"))
    smaller = large.groupBy("src").agg(F.collect_set("dst").alias("s"))
    centre = F.array_min("s")
    return smaller.select(
        F.explode(F.filter(F.array_union("s", F.array("src")), lambda v: v != centre)).alias("src"),
        centre.alias("dst"),
    )


def connected_components(edges, max_rounds: int = 64, log=None):
    """``edges(src, dst)`` (undirected, any orientation; self-loops and repeats ignored) →
    ``(node, component, rounds)``.

    Returns a DataFrame ``(node, component)`` for every node that has an edge to another node,
    ``component`` being the smallest node of its component, and the number of rounds: passes
    over the neighbourhoods, the last of which finds a star forest. Each round's neighbourhoods
    are checkpointed locally, materialised by that round's convergence check (one job), so the
    query plan does not grow with the rounds.
    """
    from pyspark.sql import functions as F

    current = edges.select("src", "dst")
    for rounds in range(1, max_rounds + 1):
        hoods = _neighbourhoods(current).localCheckpoint(eager=False)
        converged = not hoods.where(_is_star_forest_violation()).limit(1).count()
        if log:
            log.info("connected components: round %d, %s", rounds, "converged" if converged else "not converged")
        if converged:
            break
        current = _large_star_small_star(hoods)
    else:
        raise RuntimeError(f"connected components did not converge in {max_rounds} rounds")
    return hoods.select(F.col("u").alias("node"), F.least(F.array_min("nbrs"), F.col("u")).alias("component")), rounds
