"""Everything that speaks Kite Connect: limits, tick codec, ticker client, REST, simulator."""
