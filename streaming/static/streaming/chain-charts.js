// The chain page's charts, drawn with Apache ECharts (npm, package-lock.json; `make install`
// puts it in node_modules and tickerproj/static_vendor.py serves its one file). ECharts was
// chosen because one well-kept library (Apache Software Foundation, Apache-2.0) draws every
// chart the page needs, candlesticks with empty minutes included, on a canvas, with no
// dependencies at run time; uPlot needs plugins for candles, lightweight-charts draws only
// time series (no smile or OI by strike).
//
// chain.js owns the data and calls these setters; each chart redraws at most once a second
// (ChainCharts.flush from chain.js's 1 s tick), so a fast feed costs no more than a slow one.
// Every plot element carries data-points (values drawn) and data-draws (redraws so far) for
// the browser tests and for anyone curious.
"use strict";

window.ChainCharts = (function () {
  const CALL = "#c0262d";
  const PUT = "#0a7a3d";
  const MUTED = "#6e6e73";
  const BAR_WINDOW = 375; // one NSE session of 1-minute bars
  const SERIES_WINDOW = 750; // two sessions of per-minute analytics points
  const istMinute = new Intl.DateTimeFormat("en-IN", {
    timeZone: "Asia/Kolkata", hour: "2-digit", minute: "2-digit", hour12: false,
  });
  const istDay = new Intl.DateTimeFormat("en-CA", { timeZone: "Asia/Kolkata" });
  const istDate = new Intl.DateTimeFormat("en-IN", { day: "numeric", month: "short", timeZone: "Asia/Kolkata" });
  const shortDate = new Intl.DateTimeFormat("en-IN", { day: "numeric", month: "short", timeZone: "UTC" });
  const inr = new Intl.NumberFormat("en-IN");
  const pct = (v) => (v == null ? null : +(v * 100).toFixed(2));

  const BASE = {
    animation: false,
    textStyle: { fontFamily: "system-ui, -apple-system, Segoe UI, Roboto, sans-serif", fontSize: 11 },
    grid: { left: 52, right: 16, top: 28, bottom: 28 },
    tooltip: { trigger: "axis", confine: true },
    legend: { top: 0, right: 8, itemWidth: 14, itemHeight: 8, textStyle: { fontSize: 11 } },
  };

  class Plot {
    constructor(el, option) {
      this.el = el;
      this.chart = echarts.init(el, null, { renderer: "canvas" });
      this.chart.setOption({ ...BASE, ...option });
      this.dirty = false;
      this.draws = 0;
      el.dataset.points = "0";
      el.dataset.draws = "0";
    }

    draw(option, points, emptyText = "waiting for data") {
      this.chart.setOption({
        ...option,
        title: { show: points === 0, text: emptyText, left: "center", top: "middle",
                 textStyle: { color: MUTED, fontSize: 12, fontWeight: "normal" } },
      });
      this.draws += 1;
      this.el.dataset.points = String(points);
      this.el.dataset.draws = String(this.draws);
    }
  }

  function gapAreas(categories, isGap) {
    // Runs of consecutive gap minutes, as markArea pairs over the category axis.
    const areas = [];
    let start = null;
    for (let i = 0; i <= categories.length; i++) {
      if (i < categories.length && isGap[i]) {
        if (start === null) start = i;
      } else if (start !== null) {
        areas.push([{ xAxis: categories[start] }, { xAxis: categories[i - 1] }]);
        start = null;
      }
    }
    return areas;
  }

  class ChainCharts {
    constructor({ expiry }) {
      this.expiry = expiry;
      const $ = (id) => document.getElementById(id);
      // Inputs, replaced or merged by chain.js; drawn on flush().
      this.strikes = new Map(); // strike -> {ce: {iv, oi, oi_change}, pe: {...}}
      this.forward = null;
      this.atmStrike = null;
      this.term = [];
      this.series = []; // [{ts, atm_iv, straddle, pcr_oi}], one per minute, the latest value
      this.bars = new Map(); // start_ts -> bar
      this.dirty = new Set();

      const strikeAxis = {
        type: "value", min: "dataMin", max: "dataMax", axisLabel: { formatter: (v) => inr.format(v) },
      };
      this.smile = new Plot($("chart-smile"), {
        xAxis: strikeAxis,
        yAxis: { type: "value", scale: true, name: "IV %", nameGap: 8, nameTextStyle: { align: "right" } },
        series: [
          { name: "Calls", type: "line", color: CALL, showSymbol: true, symbolSize: 4, connectNulls: true, data: [] },
          // Out of the money each side solves the IV, so calls and puts mostly coincide: the
          // puts are dashed diamonds over the calls' line.
          { name: "Puts", type: "line", color: PUT, showSymbol: true, symbol: "diamond", symbolSize: 6,
            lineStyle: { type: "dashed" }, connectNulls: true, data: [] },
        ],
      });
      const byStrike = (name) => ({
        xAxis: { type: "category", data: [], axisLabel: { formatter: (v) => inr.format(v) } },
        yAxis: { type: "value", name, nameGap: 8, nameTextStyle: { align: "right" },
                 axisLabel: { formatter: (v) => compact(v) } },
        series: [
          { name: "Calls", type: "bar", color: CALL, data: [], barGap: "0%" },
          { name: "Puts", type: "bar", color: PUT, data: [] },
        ],
      });
      this.oi = new Plot($("chart-oi"), byStrike("OI"));
      this.oiChange = new Plot($("chart-oi-change"), byStrike("OI chg"));
      this.termPlot = new Plot($("chart-term"), {
        xAxis: { type: "category", data: [] },
        yAxis: { type: "value", scale: true, name: "ATM IV %", nameGap: 8, nameTextStyle: { align: "left" } },
        series: [{ name: "ATM IV", type: "line", color: "#0b57d0", symbolSize: 7, data: [] }],
        legend: { show: false },
      });
      // Three scales, each axis in its line's colour: ATM IV (%) left, straddle (₹) and PCR right.
      const IV_COLOR = "#0b57d0";
      const STRADDLE_COLOR = "#8a5a00";
      const valueAxis = (color, extra) => ({
        type: "value", scale: true, splitLine: { show: extra.position !== "right" },
        axisLabel: { color }, ...extra,
      });
      this.seriesPlot = new Plot($("chart-series"), {
        grid: { left: 44, right: 96, top: 28, bottom: 28 },
        legend: { top: 0, left: 44, itemWidth: 14, itemHeight: 8, textStyle: { fontSize: 11 } },
        xAxis: { type: "time", minInterval: 60000, axisLabel: { formatter: (v) => istMinute.format(new Date(v)) } },
        yAxis: [
          valueAxis(IV_COLOR, {}),
          valueAxis(STRADDLE_COLOR, { position: "right" }),
          valueAxis(MUTED, { position: "right", offset: 48 }),
        ],
        series: [
          { name: "ATM IV %", type: "line", yAxisIndex: 0, color: IV_COLOR, showSymbol: false, data: [] },
          { name: "Straddle ₹", type: "line", yAxisIndex: 1, color: STRADDLE_COLOR, showSymbol: false, data: [] },
          { name: "PCR (OI)", type: "line", yAxisIndex: 2, color: MUTED, showSymbol: false, data: [] },
        ],
      });
      this.candles = new Plot($("chart-candles"), {
        xAxis: { type: "category", data: [], boundaryGap: true },
        yAxis: { type: "value", scale: true },
        legend: { show: false },
        dataZoom: [{ type: "inside", startValue: 0 }],
        series: [{
          name: "bar", type: "candlestick", data: [],
          itemStyle: { color: PUT, color0: CALL, borderColor: PUT, borderColor0: CALL },
          markArea: { silent: true, itemStyle: { color: "rgba(192, 38, 45, 0.12)" }, data: [] },
        }],
      });
      this.plots = [this.smile, this.oi, this.oiChange, this.termPlot, this.seriesPlot, this.candles];
      window.addEventListener("resize", () => this.plots.forEach((p) => p.chart.resize()));
    }

    // --- inputs ---------------------------------------------------------------------------

    setQuote(strike, side, values) {
      if (!this.strikes.has(strike)) this.strikes.set(strike, { ce: {}, pe: {} });
      Object.assign(this.strikes.get(strike)[side], values);
      this.dirty.add("strikes");
    }

    setStrikes(strikes) {
      // The chain's strikes (from the subscribe reply): the x axis, empty until data comes.
      this.strikes = new Map(strikes.map((k) => [k, this.strikes.get(k) || { ce: {}, pe: {} }]));
      this.dirty.add("strikes");
    }

    setForward(forward, atmStrike) {
      if (forward === this.forward && atmStrike === this.atmStrike) return;
      this.forward = forward;
      this.atmStrike = atmStrike;
      this.dirty.add("strikes");
    }

    setTermStructure(points) {
      this.term = points || [];
      this.dirty.add("term");
    }

    setSeries(points) {
      this.series = [];
      for (const p of points || []) this.addSeriesPoint(p);
    }

    addSeriesPoint(point) {
      // One point per minute, the latest value of that minute: the live analytics arrive up to
      // once a second, the stored series once a minute.
      const last = this.series[this.series.length - 1];
      if (last && point.ts < last.ts) return;
      if (last && Math.floor(last.ts / 60000) === Math.floor(point.ts / 60000)) {
        this.series[this.series.length - 1] = point;
      } else {
        this.series.push(point);
        if (this.series.length > SERIES_WINDOW) this.series.shift();
      }
      this.dirty.add("series");
    }

    setBars(bars) {
      this.bars = new Map();
      for (const bar of bars || []) this.addBar(bar);
    }

    addBar(bar) {
      this.bars.set(bar.start_ts, bar);
      if (this.bars.size > BAR_WINDOW) {
        const oldest = Math.min(...this.bars.keys());
        this.bars.delete(oldest);
      }
      this.dirty.add("bars");
    }

    noBars(reason) {
      this.candles.draw({}, 0, reason);
    }

    // --- drawing --------------------------------------------------------------------------

    flush() {
      if (this.dirty.has("strikes")) this.drawStrikes();
      if (this.dirty.has("term")) this.drawTerm();
      if (this.dirty.has("series")) this.drawSeries();
      if (this.dirty.has("bars")) this.drawBars();
      this.dirty.clear();
    }

    drawStrikes() {
      const strikes = [...this.strikes.keys()].sort((a, b) => a - b);
      const get = (side, field) => strikes.map((k) => this.strikes.get(k)[side][field] ?? null);
      const smileData = (side) => strikes
        .map((k) => [k, pct(this.strikes.get(k)[side].iv)])
        .filter(([, v]) => v != null);
      const calls = smileData("ce");
      const puts = smileData("pe");
      const forwardLine = this.forward == null ? [] : [{
        xAxis: this.forward, label: { formatter: "F " + this.forward.toFixed(1), color: MUTED },
        lineStyle: { color: MUTED, type: "dashed" },
      }];
      this.smile.draw({
        series: [
          { data: calls, markLine: { symbol: "none", silent: true, data: forwardLine } },
          { data: puts },
        ],
      }, calls.length + puts.length);

      const labels = strikes.map(String);
      const atm = this.atmStrike == null ? [] : [{
        xAxis: String(this.atmStrike), label: { formatter: "ATM", color: MUTED },
        lineStyle: { color: MUTED, type: "dashed" },
      }];
      const drawBars = (plot, field) => {
        const ce = get("ce", field);
        const pe = get("pe", field);
        const points = ce.concat(pe).filter((v) => v != null).length;
        plot.draw({
          xAxis: { data: labels },
          series: [{ data: ce, markLine: { symbol: "none", silent: true, data: atm } }, { data: pe }],
        }, points);
      };
      drawBars(this.oi, "oi");
      drawBars(this.oiChange, "oi_change");
    }

    drawTerm() {
      const data = this.term.map((p) => ({
        value: pct(p.atm_iv),
        symbolSize: p.expiry === this.expiry ? 11 : 7,
      }));
      const labels = this.term.map((p) => {
        const day = shortDate.format(new Date(p.expiry + "T00:00:00Z"));
        return p.days_to_expiry == null ? day : day + "\n" + Math.round(p.days_to_expiry) + "d";
      });
      this.termPlot.draw({ xAxis: { data: labels }, series: [{ data }] },
                         data.filter((d) => d.value != null).length);
    }

    drawSeries() {
      const line = (f, scale) => this.series.map((p) => [p.ts, p[f] == null ? null : scale(p[f])]);
      const iv = line("atm_iv", pct);
      const straddle = line("straddle", (v) => +v.toFixed(2));
      const pcr = line("pcr_oi", (v) => +v.toFixed(3));
      const points = [iv, straddle, pcr].flat().filter(([, v]) => v != null).length;
      this.seriesPlot.draw({ series: [{ data: iv }, { data: straddle }, { data: pcr }] }, points);
    }

    drawBars() {
      // Minutes of the same IST day that have no bar at all (the engine was down) are drawn
      // as gaps too, so a hole in the data always shows as a hole in the chart.
      const starts = [...this.bars.keys()].sort((a, b) => a - b);
      const categories = [];
      const isGap = [];
      const data = [];
      let candles = 0;
      starts.forEach((ts, i) => {
        const prev = starts[i - 1];
        if (prev !== undefined && istDay.format(prev) === istDay.format(ts)) {
          for (let m = prev + 60000; m < ts; m += 60000) {
            categories.push(istMinute.format(new Date(m)));
            isGap.push(true);
            data.push("-");
          }
        }
        const bar = this.bars.get(ts);
        // The first bar of a later day says which day it is.
        const newDay = prev !== undefined && istDay.format(prev) !== istDay.format(ts);
        categories.push((newDay ? istDate.format(new Date(ts)) + " " : "") + istMinute.format(new Date(ts)));
        const gap = bar.is_gap || bar.open == null;
        isGap.push(gap);
        if (gap) {
          data.push("-");
          return;
        }
        candles += 1;
        const item = { value: [bar.open, bar.close, bar.low, bar.high] };
        if (bar.backfilled) item.itemStyle = { opacity: 0.45 };
        data.push(item);
      });
      this.candles.draw({
        xAxis: { data: categories },
        series: [{ data, markArea: { data: gapAreas(categories, isGap) } }],
      }, candles);
      this.candles.el.dataset.gaps = String(isGap.filter(Boolean).length);
    }
  }

  function compact(v) {
    const a = Math.abs(v);
    if (a >= 1e7) return +(v / 1e7).toFixed(1) + "Cr";
    if (a >= 1e5) return +(v / 1e5).toFixed(1) + "L";
    if (a >= 1e3) return +(v / 1e3).toFixed(1) + "k";
    return String(v);
  }

  return ChainCharts;
})();
