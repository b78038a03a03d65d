"""Connected components of an edge DataFrame, computed in Spark (never collected on the driver).

Alternating large-star / small-star (Kiveris et al., "Connected Components in MapReduce and
Beyond", SoCC 2014): every round is two groupBy+join passes over the edges; after O(log n) rounds
the graph is a forest of stars whose centres are each component's smallest node. Node ids are any
orderable Spark type (here the ``doc_id`` strings, so there is no id mapping and no collision risk).
"""

from __future__ import annotations


def _large_star(edges):
    """Connect every neighbour larger than u to m(u) = min(N(u) ∪ {u})."""
    from pyspark.sql import functions as F

    both = edges.select("src", "dst").unionByName(edges.select(F.col("dst").alias("src"), F.col("src").alias("dst")))
    m = both.groupBy("src").agg(F.least(F.min("dst"), F.col("src")).alias("m"))
    return (
        both.join(m, "src").where(F.col("dst") > F.col("src"))
        .select(F.col("dst").alias("src"), F.col("m").alias("dst")).distinct()
    )


def _small_star(edges):
    """Edges point larger → smaller; connect u and its smaller neighbours to the smallest of them."""
    from pyspark.sql import functions as F

    m = edges.groupBy("src").agg(F.min("dst").alias("m"))
    joined = edges.join(m, "src")
    neighbours = joined.where(F.col("dst") != F.col("m")).select(F.col("dst").alias("src"), "m")
    centre = joined.select("src", "m")
    return neighbours.unionByName(centre).select("src", F.col("m").alias("dst")).distinct()


def connected_components(edges, max_rounds: int = 64, log=None):
    """``edges(src, dst)`` (undirected, any orientation; self-loops and repeats ignored) →
    ``(node, component, rounds)``.

    Returns a DataFrame ``(node, component)`` for every node that has an edge, ``component`` being
    the smallest node of its component, and the number of rounds run. Each round's edges are
    checkpointed locally (materialised by the round's convergence check, one job) so the query plan
    does not grow with the rounds.
    """
    from pyspark.sql import functions as F

    current = edges.select("src", "dst")
    for rounds in range(1, max_rounds + 1):
        current = _small_star(_large_star(current)).localCheckpoint(eager=False)
        # converged when it is a star forest: no centre (dst) has an edge to a smaller node
        unfinished = current.select(F.col("dst").alias("src")).distinct().join(current.select("src"), "src", "left_semi")
        pending = unfinished.limit(1).count()
        if log:
            log.info("connected components: round %d, %s", rounds, "converged" if not pending else "not converged")
        if not pending:
            break
    else:
        raise RuntimeError(f"connected components did not converge in {max_rounds} rounds")
    centres = current.select(F.col("dst").alias("node"), F.col("dst").alias("component")).distinct()
    return current.select(F.col("src").alias("node"), F.col("dst").alias("component")).unionByName(centres), rounds
