// The lab's panels, in page order. A new panel is one module plus one line here; the analyses
// the server's registry lists without a panel of their own appear in "analyses".
import ablate from "./ablate.js";
import analyses from "./analyses.js";
import circuit from "./circuit.js";
import dla from "./dla.js";
import flow from "./flow.js";
import gen from "./gen.js";
import head from "./head.js";
import lens from "./lens.js";
import patch from "./patch.js";
import prompt from "./prompt.js";
import resid from "./resid.js";
import tokens from "./tokens.js";

export const PANELS = [prompt, tokens, dla, head, lens, resid, circuit, flow, patch, ablate, analyses, gen];
